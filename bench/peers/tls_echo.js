// TLS line echo with Node's tls module, written as its docs show (a
// tls.createServer with key and cert, the usual 'data' handler).
//   node bench/peers/tls_echo.js PORT CERTFILE KEYFILE
'use strict';
const fs = require('fs');
const tls = require('tls');
const lineEcho = require('./line_echo');

const [port, certfile, keyfile] = process.argv.slice(2);

const server = tls.createServer({
  key: fs.readFileSync(keyfile),
  cert: fs.readFileSync(certfile),
}, (socket) => {
  socket.setNoDelay(true);
  lineEcho(socket);
});

server.listen(Number(port), '127.0.0.1');
