// Line echo with Node's net module, written the way a Node user who cares
// about throughput writes it: the 'data' handler splits the chunk into
// lines as line_echo.js does, but sends the replies of one chunk with one
// socket.write (joined) instead of one write per line.
//   node bench/peers/node_batch_echo.js PORT
'use strict';
const net = require('net');

const port = Number(process.argv[2]);

const server = net.createServer({noDelay: true}, (socket) => {
  let pending = '';
  socket.setEncoding('latin1');
  socket.on('data', (chunk) => {
    const lines = (pending + chunk).split('\n');
    pending = lines.pop();
    if (lines.length === 0) return;
    const out = new Array(lines.length);
    for (let i = 0; i < lines.length; i++) out[i] = lines[i] + '\n';
    socket.write(out.join(''), 'latin1');
  });
  socket.on('error', () => {});
});

server.listen(port, '127.0.0.1');
