-- Shared by the specs: paths to the build tree, servers on port 0, clients,
-- real peer processes and log capture.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
-- TS_BUILD names another build tree (make sanitize builds into its own).
local BUILD = os.getenv("TS_BUILD") or "build"
package.cpath = BUILD .. "/?.so;" .. package.cpath

local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local log = require "tcpserver.log"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"
local testing = require "tcpserver.testing"

process.raise_fd_limit()

local H = {}
H.async = testing.async
H.BUILD = BUILD
H.LUAHOST = BUILD .. "/luahost"

--- A server whose handle_stream is `handler`, listening on 127.0.0.1:0.
function H.serve(handler, opts)
  local Server = tcpserver.TCPServer:extend({handle_stream = handler})
  local server = Server(opts)
  local port = server:listen(0, "127.0.0.1")
  return server, port
end

function H.connect(port)
  return assert(tcpclient.connect("127.0.0.1", port))
end

--- A handle_stream that echoes lines until the peer closes.
function H.echo_lines(_, stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    stream:write(line)
  end
end

--- A luahost script: a line echo on 127.0.0.1 that prints "PORT ARG1"
-- once listening; a "slow" line takes 0.2 s to echo.
H.ECHO_SCRIPT = [[
local tcpserver = require "tcpserver"
local Echo = tcpserver.TCPServer:extend()
function Echo:handle_stream(stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    if line == "slow\n" then require("tcpserver.ioloop").sleep(0.2) end
    stream:write(line)
  end
end
local port = Echo():listen(0, "127.0.0.1")
io.stdout:write(port, " ", arg[1] or "", "\n")
io.stdout:flush()
]]

--- Writes `source` to a temporary file; returns its path.
function H.script_file(source)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(source)
  f:close()
  return path
end

--- Runs argv with `input` on its stdin; returns its stdout, exit status,
-- signal and stderr (collected, so peers' chatter stays out of the report).
function H.run(argv, input, env)
  local p = process.Subprocess(argv, {stdin = "pipe", stdout = "pipe", stderr = "pipe", env = env})
  local err, err_done = nil, locks.Event()
  ioloop.current():spawn_callback(function()
    err = p.stderr:read_until_close()
    err_done:set()
  end)
  if input then p.stdin:write(input) end
  p.stdin:close()
  local out = p.stdout:read_until_close()
  err_done:wait()
  local status, signal = p:wait_for_exit()
  return out, status, signal, err
end

-- Debian's python3 directly: a version manager's shim in PATH can take a
-- second to start.
H.PYTHON = io.open("/usr/bin/python3") and "/usr/bin/python3" or "python3"

--- Runs a Python 3 snippet; extra args land in sys.argv[1:]. Returns its
-- stdout and exit status.
function H.python(code, ...)
  return H.run({H.PYTHON, "-c", code, ...})
end

--- Sends `line` to the unix socket at `path` from Python; returns the
-- line that comes back.
function H.unix_line(path, line)
  return H.python([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
sys.stdout.write(s.makefile("rb").readline().decode())
]], path, line)
end

--- Collects log lines until the returned function is called to restore.
function H.capture_logs()
  local lines = {}
  log.set_handler(function(level, message) lines[#lines + 1] = level .. ": " .. message end)
  return lines, function() log.set_handler(nil) end
end

--- Waits (polling each 10 ms) until cond() holds; for states with no event.
function H.wait_until(cond, timeout)
  local deadline = ioloop.current():time() + (timeout or 5)
  while not cond() do
    if ioloop.current():time() > deadline then error("wait_until: timed out", 2) end
    ioloop.sleep(0.01)
  end
end

local certs

--- Test certificates made with `openssl req` on first use: a CA, a server
-- certificate for localhost/127.0.0.1, one for other.test (SNI), a client
-- certificate, and a self-signed one no CA vouches for. Returns their paths.
function H.certs()
  if certs then return certs end
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. dir))
  local script = [[
set -e
cd "$1"
key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
}
key ca
openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj "/CN=tcpserver test CA" 2>/dev/null
sign() { # name cn san
  key "$1"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf 'subjectAltName=%s
' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out "$1.pem" -days 2 -extfile "$1.ext" 2>/dev/null
}
sign server localhost "DNS:localhost,IP:127.0.0.1"
sign other other.test "DNS:other.test"
sign client "test client" "DNS:client.test"
key self
openssl req -x509 -new -key self.key -out self.pem -days 2 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
]]
  local f = assert(io.open(dir .. "/make.sh", "w"))
  f:write(script)
  f:close()
  assert(os.execute("sh " .. dir .. "/make.sh " .. dir), "openssl failed to make test certificates")
  certs = {dir = dir}
  for _, name in ipairs {"ca", "server", "other", "client", "self"} do
    certs[name] = {certfile = dir .. "/" .. name .. ".pem", keyfile = dir .. "/" .. name .. ".key"}
  end
  certs.cafile = certs.ca.certfile
  return certs
end

H.loop = ioloop.current()
return H
