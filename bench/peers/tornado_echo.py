"""Line echo with Tornado's TCPServer, as its documentation shows it
(tornado.tcpserver.TCPServer, handle_stream, read_until(b"\\n")).

    /usr/bin/python3 bench/peers/tornado_echo.py PORT
"""
import sys

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.tcpserver import TCPServer


class EchoServer(TCPServer):
    async def handle_stream(self, stream, address):
        stream.set_nodelay(True)
        while True:
            try:
                data = await stream.read_until(b"\n")
                await stream.write(data)
            except StreamClosedError:
                break


if __name__ == "__main__":
    server = EchoServer()
    server.listen(int(sys.argv[1]), "127.0.0.1")
    IOLoop.current().start()
