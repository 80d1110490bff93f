-- Real processes for the specs: luahost scripts (which may fork), their
-- output read line by line as events, and clients that keep connecting.
-- The busted process itself never forks: forking servers run under
-- build/luahost as a Subprocess.
local H = require "spec.helper"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"

local P = {}
P.LUAHOST = H.LUAHOST
P.python = H.python

--- Writes `source` to a temporary file; returns its path.
function P.tmpfile(source)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(source or "")
  f:close()
  return path
end

--- A port that nothing listens on right now (bound, then closed): for
-- servers that bind it themselves with reuse_port.
function P.free_port()
  local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
  local _, port = sock:getsockname()
  sock:close()
  return port
end

-- Reads a stream line by line into `lines`; `changed` is set on each line
-- and at the end.
local Lines = {}
Lines.__index = Lines

local function reader(stream)
  local self = setmetatable({lines = {}, used = {}, closed = false, changed = locks.Event()}, Lines)
  ioloop.current():spawn(function()
    while true do
      local line = stream:read_until("\n")
      if not line then break end
      self.lines[#self.lines + 1] = line:sub(1, -2)
      self.changed:set()
    end
    self.closed = true
    self.changed:set()
  end)
  return self
end

function Lines:wait_change()
  self.changed:clear()
  self.changed:wait()
end

--- Returns the captures of the first line not matched before that
-- matches `pattern`, waiting for more lines as needed (workers write in any
-- order). Raises if the stream ends first.
function Lines:await(pattern)
  while true do
    for i, line in ipairs(self.lines) do
      if not self.used[i] then
        local caps = table.pack(line:match(pattern))
        if caps[1] ~= nil then
          self.used[i] = true
          return table.unpack(caps, 1, caps.n)
        end
      end
    end
    if self.closed then
      error(("no line matched '%s'; got:\n%s"):format(pattern, table.concat(self.lines, "\n")), 2)
    end
    self:wait_change()
  end
end

--- Waits until the stream ends; returns every line it carried.
function Lines:all()
  while not self.closed do self:wait_change() end
  return self.lines
end

--- Every line so far as one string (for failure messages).
function Lines:text()
  return table.concat(self.lines, "\n")
end

local started = {}

--- For after_each: kills what a spec started and left running (its workers
-- follow, PR_SET_PDEATHSIG) and removes the script files.
function P.cleanup()
  for _, s in ipairs(started) do
    s.proc:kill(9)
    if s.path then os.remove(s.path) end
  end
  started = {}
end

--- Runs `luahost [flags...] script args...`; `script` is Lua source. The
-- result has .out and .err (line readers), :kill(sig), :wait() -> status,
-- signal. opts: flags (list), env (table), argv (a full argv instead).
function P.luahost(source, args, opts)
  opts = opts or {}
  return P.run_script(P.tmpfile(source), args, opts, true)
end

--- Runs `luahost examples/NAME.lua args...` as P.luahost does, and waits
-- for its "listening on HOST:PORT" log line; returns the process and the port.
function P.example(name, args, opts)
  local p = P.run_script("examples/" .. name .. ".lua", args, opts or {})
  return p, tonumber(p.err:await("listening on %S+:(%d+)"))
end

-- Starts luahost on the script at `path`; `temporary`: remove it at cleanup.
function P.run_script(path, args, opts, temporary)
  local argv = {P.LUAHOST}
  for _, f in ipairs(opts.flags or {}) do argv[#argv + 1] = f end
  argv[#argv + 1] = path
  for _, a in ipairs(args or {}) do argv[#argv + 1] = tostring(a) end
  if opts.launcher then argv = opts.launcher(argv) end
  local p = process.Subprocess(argv, {stdout = "pipe", stderr = "pipe", env = opts.env})
  started[#started + 1] = {proc = p, path = temporary and path}
  return {
    proc = p, pid = p.pid, script = path,
    out = reader(p.stdout), err = reader(p.stderr),
    kill = function(_, sig) return p:kill(sig) end,
    wait = function() return p:wait_for_exit() end,
  }
end

--- P.luahost under plain `lua5.4` instead: the script finds the modules
-- of this tree through LUA_PATH and LUA_CPATH, and starts the loop itself.
function P.lua(source, args, opts)
  opts = opts or {}
  local env = {LUA_PATH = "lua/?.lua;lua/?/init.lua;;", LUA_CPATH = H.BUILD .. "/?.so;;",
               PATH = os.getenv("PATH")}
  -- make sanitize: the runtime preloaded into lua5.4, and where it reports.
  for _, k in ipairs {"LD_PRELOAD", "ASAN_OPTIONS", "LSAN_OPTIONS", "UBSAN_OPTIONS"} do
    env[k] = os.getenv(k)
  end
  for k, v in pairs(opts.env or {}) do env[k] = v end
  return P.luahost(source, args, {env = env, launcher = function(argv)
    argv[1] = "lua5.4"
    return argv
  end})
end

-- Execs argv[2..] with listening sockets from fd 3 on, the way systemd's
-- socket activation passes them. argv[1] says what to pass: "N:name,..."
-- (N sockets on 127.0.0.1, port 0, with these LISTEN_FDNAMES; the ports go
-- to stdout as "port P"), "unix:PATH" (a unix socket named "local"), "file"
-- (a regular file at fd 3), or "env:FDS:PID" (just these variables, PID
-- "self" for the exec'd pid).
local SYSTEMD = [[
import os, socket, sys
what, argv = sys.argv[1], sys.argv[2:]
env = dict(os.environ)
if what == "file":
    fd = os.open("/dev/null", os.O_RDONLY)
    if fd != 3:
        os.dup2(fd, 3)
    os.set_inheritable(3, True)
    env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
elif what.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(what[5:])
    s.listen(16)
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="local")
elif what.startswith("env:"):
    _, fds, pid = what.split(":")
    env.update(LISTEN_FDS=fds, LISTEN_PID=str(os.getpid()) if pid == "self" else pid)
else:
    n, names = what.split(":", 1)
    socks = []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
        print("port", s.getsockname()[1], flush=True)
    fds = [os.dup(s.fileno()) for s in socks]  # above 3..3+n, then moved down
    for s in socks:
        s.close()
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)  # inheritable
        os.close(fd)
    env.update(LISTEN_FDS=n, LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
os.execve(argv[0], argv, env)
]]

--- opts.launcher for P.luahost: run luahost the way systemd would, with
-- `what` as described above.
function P.systemd(what)
  return function(argv)
    return {H.PYTHON, "-c", SYSTEMD, what, table.unpack(argv)}
  end
end

--- A server script for the drain specs: shutdown_timeout arg[1], arg[2]
-- processes (2 by default) from server:start. "slow" makes a request that
-- stays in flight until the client sends another line. Prints "port P"
-- once bound; P.UP then prints "up <task id>" ("up nil" without a fork).
P.DRAIN = [[
local tcpserver = require "tcpserver"
local process = require "tcpserver.process"
local Server = tcpserver.TCPServer:extend()
function Server:handle_stream(stream)
  local line = stream:read_until("\n")
  if line == "slow\n" then
    stream:write("working " .. tostring(process.task_id()) .. "\n")
    local more, err = stream:read_until("\n")
    stream:write("done " .. (more or err .. "\n"))
  else
    stream:write("ok\n")
  end
end
local server = Server({shutdown_timeout = tonumber(arg[1])})
print("port " .. server:bind(0, "127.0.0.1"))
io.stdout:flush()
server:start(tonumber(arg[2]) or 2)
]]
P.UP = [[
print("up " .. tostring(require("tcpserver.process").task_id()))
io.stdout:flush()
]]

--- What a plain lua5.4 script ends with to serve: luahost does it itself.
P.LOOP = 'require("tcpserver.ioloop").current():start()\n'

--- Waits for the port and `n` "up" lines that `p` (running P.DRAIN)
-- prints, then leaves a "slow" request in flight. Returns the client
-- stream and the port.
function P.request_in_flight(p, n)
  local port = tonumber(p.out:await("^port (%d+)"))
  for _ = 1, n do p.out:await("^up ") end
  local c = H.connect(port)
  c:write("slow\n")
  assert(c:read_until("\n"):match("^working "))
  return c, port
end

--- One request: connect, send `line`, read one line back.
function P.request(port, line)
  local c, err = tcpclient.connect("127.0.0.1", port)
  if not c then return nil, err end
  c:write(line)
  local reply, rerr = c:read_until("\n")
  c:close()
  return reply, rerr
end

--- A client that connects again and again (one request each) until
-- :stop(); counts replies by their first word and errors by message.
-- :wait_requests(n) waits for n more successful requests.
function P.hammer(port, line)
  local h = {ok = 0, replies = {}, errors = {}, stopped = false, done = locks.Event(),
             progress = locks.Event()}
  ioloop.current():spawn(function()
    while not h.stopped do
      local reply, err = P.request(port, line or "hi\n")
      if reply then
        h.ok = h.ok + 1
        local key = reply:match("^(%S+)")
        h.replies[key] = (h.replies[key] or 0) + 1
        h.progress:set()
      else
        h.errors[err] = (h.errors[err] or 0) + 1
      end
    end
    h.done:set()
  end)
  function h.wait_requests(_, count)
    local target = h.ok + count
    while h.ok < target do
      h.progress:clear()
      h.progress:wait()
    end
  end
  function h.stop()
    h.stopped = true
    h.done:wait()
    return h
  end
  return h
end

return P
