// Line echo with Node's net module, as its docs show: net.createServer and
// the usual stream 'data' handler that splits the input into lines.
//   node bench/peers/node_echo.js PORT
'use strict';
const net = require('net');

const port = Number(process.argv[2]);

const server = net.createServer({noDelay: true}, (socket) => {
  let pending = '';
  socket.setEncoding('latin1');
  socket.on('data', (chunk) => {
    const lines = (pending + chunk).split('\n');
    pending = lines.pop();
    for (const line of lines) socket.write(line + '\n', 'latin1');
  });
  socket.on('error', () => {});
});

server.listen(port, '127.0.0.1');
