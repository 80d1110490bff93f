-- TLS line echo with tcpserver: the plain echo (examples/echo.lua) with
-- ssl_options.  bench/run starts it as
--   luahost bench/peers/tls_echo.lua PORT CERTFILE KEYFILE
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"

local port, certfile, keyfile = tonumber(arg[1]), arg[2], arg[3]

local TLSEcho = tcpserver.TCPServer:extend()

function TLSEcho:handle_stream(stream)
  while true do
    local line = stream:read_until("\n")
    if not line then break end
    stream:write(line)
  end
end

local server = TLSEcho({ssl_options = {certfile = certfile, keyfile = keyfile}})
server:listen(port, "127.0.0.1")
ioloop.current():start()
