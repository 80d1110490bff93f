// The 'data' handler both Node peers use, as Node's docs show it: split the
// input into lines and write each one back.
'use strict';

module.exports = function lineEcho(socket) {
  let pending = '';
  socket.setEncoding('latin1');
  socket.on('data', (chunk) => {
    const lines = (pending + chunk).split('\n');
    pending = lines.pop();
    for (const line of lines) socket.write(line + '\n', 'latin1');
  });
  socket.on('error', () => {});
};
