-- Echo server: every line a client sends comes back.
--   luahost examples/echo.lua [port]      (8888 by default)
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local EchoServer = tcpserver.TCPServer:extend()

function EchoServer:handle_stream(stream, address)
  log.debug("connection from %s", address) -- formatted only if logged
  while true do
    local line = stream:read_until("\n")
    if not line then break end
    stream:write(line)
  end
end

local port = tonumber(arg and arg[1]) or 8888
local server = EchoServer()
port = server:listen(port, "127.0.0.1")
log.info("echo server listening on 127.0.0.1:%d", port)
ioloop.current():start()
