-- Echo server: every line a client sends comes back.
--   luahost examples/echo.lua [--port 8888] [--host 127.0.0.1]
--                             [--certfile cert.pem --keyfile key.pem [--session-tickets N]]
-- With a certificate and key it serves TLS. The old positional form
-- `luahost examples/echo.lua PORT [CERTFILE KEYFILE]` works too.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

-- --port/--host (and any other flag a script declares) with their
-- defaults; false means "a string, optional".
local opts = require("tcpserver.flags").parse(arg,
  {port = 8888, host = "127.0.0.1", certfile = false, keyfile = false, session_tickets = 1},
  {"port", "certfile", "keyfile"})

local EchoServer = tcpserver.TCPServer:extend()

-- One coroutine per connection: the reads look blocking, the loop is not.
function EchoServer:handle_stream(stream, address)
  log.debug("connection from %s", address) -- formatted only if logged
  while true do
    local line = stream:read_until("\n")
    if not line then break end -- nil, "closed": the client went away
    stream:write(line)
  end
end

local tls = opts.certfile and {certfile = opts.certfile, keyfile = opts.keyfile,
                               session_tickets = opts.session_tickets}
local server = EchoServer({ssl_options = tls or nil})
local port = server:listen(opts.port, opts.host) -- the bound port (with 0: the kernel's pick)
log.info("echo server listening on %s:%d%s", opts.host, port, tls and " (TLS)" or "")
ioloop.current():start()
