-- Echo server: every line a client sends comes back.
--   luahost examples/echo.lua [port [certfile keyfile]]
-- (port 8888 by default; with a certificate and key it serves TLS)
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
local certfile, keyfile = arg and arg[2], arg and arg[3]
local server = EchoServer(certfile and {ssl_options = {certfile = certfile, keyfile = keyfile}})
port = server:listen(port, "127.0.0.1")
log.info("echo server listening on 127.0.0.1:%d%s", port, certfile and " (TLS)" or "")
ioloop.current():start()
