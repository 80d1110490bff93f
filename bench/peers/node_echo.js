// Line echo with Node's net module, as its docs show: net.createServer and
// the usual stream 'data' handler that splits the input into lines.
//   node bench/peers/node_echo.js PORT
'use strict';
const net = require('net');
const lineEcho = require('./line_echo');

const port = Number(process.argv[2]);

const server = net.createServer({noDelay: true}, lineEcho);

server.listen(port, '127.0.0.1');
