-- TLS echo server: the echo server over TLS, with a certificate of its own.
--   luahost examples/tls_echo.lua [--port 8443] [--host 127.0.0.1]
--                                 [--certfile cert.pem --keyfile key.pem]
--   openssl s_client -connect 127.0.0.1:8443 -quiet
--
-- If the certificate or key file does not exist yet (by default
-- $TMPDIR/tcpserver-tls_echo.pem and .key), it makes a self-signed
-- certificate for localhost and 127.0.0.1 there with the openssl command,
-- and uses the same one on every later run. Clients that should verify it
-- take the certificate itself as their CA file (`-CAfile`).
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg,
  {port = 8443, host = "127.0.0.1", certfile = false, keyfile = false})

local tmp = os.getenv("TMPDIR") or "/tmp"
local certfile = opts.certfile or tmp .. "/tcpserver-tls_echo.pem"
local keyfile = opts.keyfile or tmp .. "/tcpserver-tls_echo.key"

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

local function quote(s) -- for the shell
  return "'" .. s:gsub("'", [['\'']]) .. "'"
end

-- A P-256 key and a self-signed certificate valid for a year. This runs
-- once, before the loop starts, so blocking in os.execute is fine here.
-- (umask 077: the key is readable by its owner only.)
local function make_certificate()
  log.info("making a self-signed certificate: %s, %s", certfile, keyfile)
  local ok = os.execute(("umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 " ..
    "-nodes -days 365 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 " ..
    "-keyout %s -out %s 2>/dev/null && chmod 644 %s"):format(quote(keyfile), quote(certfile), quote(certfile)))
  if not ok then error("openssl could not make a certificate (is it installed?)", 0) end
end

if not (exists(certfile) and exists(keyfile)) then make_certificate() end

local TLSEcho = tcpserver.TCPServer:extend()

function TLSEcho:handle_stream(stream, address)
  -- The handshake runs by itself before the first read; waiting for it
  -- here tells a failed one (a plain-text client, say) apart and gives
  -- the negotiated version.
  local ok, err = stream:wait_for_handshake()
  if not ok then
    log.info("%s: %s", address, err)
    return
  end
  log.debug("%s speaks %s", address, stream:tls_version())
  while true do
    local line = stream:read_until("\n")
    if not line then break end
    stream:write(line)
  end
end

-- ssl_options takes Tornado's names (LuaSec's certificate/key work too).
local server = TLSEcho({ssl_options = {certfile = certfile, keyfile = keyfile}})
local port = server:listen(opts.port, opts.host)
log.info("TLS echo server listening on %s:%d", opts.host, port)
ioloop.current():start()
