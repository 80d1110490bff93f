-- Real processes for the specs: luahost scripts (which may fork), their
-- output read line by line as events, and clients that keep connecting.
-- The busted process itself never forks: forking servers run under
-- build/luahost as a Subprocess.
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"

local P = {}
P.LUAHOST = "build/luahost"

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
    os.remove(s.path)
  end
  started = {}
end

--- Runs `luahost [flags...] script args...`; `script` is Lua source. The
-- result has .out and .err (line readers), :kill(sig), :wait() -> status,
-- signal. opts: flags (list), env (table), argv (a full argv instead).
function P.luahost(source, args, opts)
  opts = opts or {}
  local path = P.tmpfile(source)
  local argv = {P.LUAHOST}
  for _, f in ipairs(opts.flags or {}) do argv[#argv + 1] = f end
  argv[#argv + 1] = path
  for _, a in ipairs(args or {}) do argv[#argv + 1] = tostring(a) end
  if opts.launcher then argv = opts.launcher(argv) end
  local p = process.Subprocess(argv, {stdout = "pipe", stderr = "pipe", env = opts.env})
  started[#started + 1] = {proc = p, path = path}
  return {
    proc = p, pid = p.pid, script = path,
    out = reader(p.stdout), err = reader(p.stderr),
    kill = function(_, sig) return p:kill(sig) end,
    wait = function() return p:wait_for_exit() end,
  }
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
