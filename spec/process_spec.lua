local H = require "spec.helper"
local process = require "tcpserver.process"
local testing = require "tcpserver.testing"

local async = H.async

describe("process", function()
  it("cpu_count is a positive integer", function()
    local n = process.cpu_count()
    assert.is_true(math.type(n) == "integer" and n >= 1)
  end)

  it("raise_fd_limit returns the descriptor limit", function()
    assert.is_true(process.raise_fd_limit() >= 1024)
  end)

  describe("Subprocess", function()
    it("streams stdin and stdout of a child", async(function()
      local p = process.Subprocess({"cat"}, {stdin = "pipe", stdout = "pipe"})
      assert.is_true(p.pid > 0)
      p.stdin:write("through cat\n")
      assert.equal("through cat\n", p.stdout:read_until("\n"))
      p.stdin:close()
      assert.equal("", p.stdout:read_until_close())
      assert.same({0, 0}, {p:wait_for_exit()})
    end))

    it("reports the exit status and the terminating signal", async(function()
      local _, status = H.run({"sh", "-c", "exit 3"})
      assert.equal(3, status)
      local p = process.Subprocess({"sleep", "10"})
      p:kill(9)
      assert.same({0, 9}, {p:wait_for_exit()})
    end))

    it("passes the environment when given", async(function()
      local out = H.run({"sh", "-c", "echo $GREETING"}, nil, {GREETING = "hi", PATH = os.getenv("PATH")})
      assert.equal("hi\n", out)
    end))

    it("raises for a program that does not exist, and for bad options", function()
      assert.has_error(function() process.Subprocess({"/no/such/program"}) end)
      assert.has_error(function() process.Subprocess({}) end, "Subprocess: argv must be a non-empty list of strings")
      assert.has_error(function() process.Subprocess({"cat"}, {stdin = "file"}) end,
                       'Subprocess: stdin must be "pipe", "null" or nil')
    end)
  end)
end)

-- fork_processes and its supervisor, with real forks: every forking server
-- runs under build/luahost (spec/procs.lua), never in busted itself.
local P = require "spec.procs"

-- A server for the restart specs: replies "<task id> <pid>" and then obeys
-- the command it got ("exit N"); prints "up <id> <pid>" in each worker.
local COMMANDS = [[
local tcpserver = require "tcpserver"
local process = require "tcpserver.process"
local Server = tcpserver.TCPServer:extend()
function Server:handle_stream(stream)
  local cmd, n = stream:read_until("\n"):match("^(%a+) ?(%d*)")
  stream:write(("%d %d\n"):format(process.task_id(), process.getpid()))
  stream:flush()
  if cmd == "exit" then os.exit(tonumber(n)) end
end
local server = Server()
print("port " .. server:bind(0, "127.0.0.1"))
io.stdout:flush()
server:start(3, tonumber(arg[1]))
print(("up %d %d"):format(process.task_id(), process.getpid()))
io.stdout:flush()
]]

local function ups(p, n)
  local pids = {}
  for _ = 1, n do
    local id, pid = p.out:await("^up (%d+) ?(%d*)$")
    pids[tonumber(id)] = tonumber(pid) or true
  end
  return pids
end

describe("process.fork_processes", function()
  after_each(P.cleanup)

  it("gives task ids 0..n-1, task_id() agrees, the loop survives the fork, "
     .. "and the parent exits 0 when all children have", async(function()
    local p = P.luahost([[
local process = require "tcpserver.process"
local ioloop = require "tcpserver.ioloop"
-- made before the fork, run by each child's loop
ioloop.current():call_later(0, function() print("timer " .. process.task_id()) end)
local id = process.fork_processes(3)
print(("up %d %s %d"):format(id, tostring(process.task_id()), process.getpid()))
]])
    local lines = p.out:all()
    table.sort(lines)
    assert.equal(6, #lines, table.concat(lines, "\n"))
    for id = 0, 2 do
      assert.matches(("^up %d %d %%d+$"):format(id, id), lines[id + 4])
      assert.equal("timer " .. id, lines[id + 1])
    end
    assert.same({0, 0}, {p:wait()})
    p.err:await("Starting 3 processes")
    for id = 0, 2 do p.err:await("child " .. id .. " %(pid %d+%) exited normally") end
  end))

  it("restarts a child that exits non-zero or is killed, with the same id and a new pid, "
     .. "but not one that exits 0", async(function()
    local p = P.luahost(COMMANDS, {3})
    local port = tonumber(p.out:await("^port (%d+)"))
    local pids = ups(p, 3)

    local function exit_one(status)
      local id, pid = assert(P.request(port, "exit " .. status .. "\n")):match("(%d+) (%d+)")
      return tonumber(id), tonumber(pid)
    end
    local id, pid = exit_one(2)
    assert.equal(pids[id], pid)
    local new = tonumber(p.out:await("^up " .. id .. " (%d+)"))
    assert.are_not.equal(pid, new)
    pids[id] = new
    p.err:await("child " .. id .. " %(pid " .. pid .. "%) exited with status 2, restarting")

    local out, status, signal = H.run({"kill", "-KILL", tostring(pids[1])})
    assert.same({"", 0, 0}, {out, status, signal})
    new = tonumber(p.out:await("^up 1 (%d+)"))
    assert.are_not.equal(pids[1], new)
    p.err:await("child 1 %(pid " .. pids[1] .. "%) killed by signal 9, restarting")

    for _ = 1, 3 do exit_one(0) end -- each worker once: none comes back
    assert.same({0, 0}, {p:wait()})
    local up = 0
    for _, line in ipairs(p.out:all()) do
      if line:match("^up ") then up = up + 1 end
    end
    assert.equal(5, up, p.out:text())
  end))

  -- A worker that crashes once its loop runs: task 0 exits 3 at once, the
  -- others keep running (a timer) until they are told to stop.
  local CRASHER = [[
local process = require "tcpserver.process"
local ioloop = require "tcpserver.ioloop"
local id = process.fork_processes(tonumber(arg[1]), tonumber(arg[2]))
print("up " .. id)
io.stdout:flush()
if id == 0 then ioloop.current():add_callback(os.exit, 3)
else ioloop.current():call_later(60, print) end
]]

  it("gives up after max_restarts: stops the others and raises in the parent", async(function()
    local p = P.luahost(CRASHER, {2, 1})
    local status = p:wait()
    assert.equal(1, status)
    p.err:await("luahost: fork_processes: too many child restarts %(1%), giving up: "
                .. "child 0 %(pid %d+%) exited with status 3$")
    -- stdout ends once every worker is gone: task 1 was stopped
    local up0 = 0
    for _, line in ipairs(p.out:all()) do
      if line == "up 0" then up0 = up0 + 1 end
    end
    assert.equal(2, up0) -- task 0, and one restart
  end))

  it("restarts with exponential back-off", async(function()
    local p = P.luahost(CRASHER, {1, 4})
    assert.equal(1, p:wait())
    local delays = {}
    for _, line in ipairs(p.err:all()) do
      local d, k = line:match("child 0 %(pid %d+%) exited with status 3, restarting in "
                              .. "(%S+) s %(restart (%d) of 4%)$")
      if d then delays[tonumber(k)] = d end
    end
    assert.same({"0.1", "0.2", "0.4", "0.8"}, delays)
    assert.equal(5, #p.out:all())
  end))

  it("forks one child per CPU for nil, 0 or a negative number", async(function()
    for _, n in ipairs {"nil", "0", "-1"} do
      local p = P.luahost([[
local process = require "tcpserver.process"
print(process.fork_processes(tonumber(arg[1])))
]], {n})
      assert.equal(process.cpu_count(), #p.out:all(), n)
      assert.same({0, 0}, {p:wait()})
    end
  end))

  it("restarts at most 100 times by default", async(function()
    local p = P.luahost(CRASHER, {1})
    p.err:await("child 0 %(pid %d+%) exited with status 3, restarting in 0.1 s %(restart 1 of 100%)")
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("a worker that fails before its loop runs stops the start: one line, exit 1, no restart", async(function()
    -- luahost --workers binds with reuse_port in each worker: the port is
    -- in use by a socket without it
    local sock, port = testing.bind_unused_port()
    finally(function() sock:close() end)
    local p = P.luahost('require("tcpserver").TCPServer():listen(tonumber(arg[1]), "127.0.0.1")',
                        {port}, {flags = {"--workers", "2"}})
    assert.same({1, 0}, {p:wait()})
    local lines = {}
    for _, line in ipairs(p.err:all()) do
      if not line:match("Starting 2 processes") then lines[#lines + 1] = line end
    end
    assert.equal(1, #lines, p.err:text())
    assert.matches("^luahost: fork_processes: worker [01] %(pid %d+%) failed before its loop ran: "
                   .. ".*cannot listen on 127%.0%.0%.1:" .. port .. ": Address already in use$", lines[1])
    assert.same({}, p.out:all())
  end))

  it("so does one that exits non-zero before its loop runs, when nothing reports why", async(function()
    local p = P.lua([[
local process = require "tcpserver.process"
process.fork_processes(2)
os.exit(3)
]])
    assert.same({1, 0}, {p:wait()})
    p.err:await("fork_processes: worker [01] %(pid %d+%) exited with status 3 before its loop ran$")
    assert.is_nil(p.err:text():match("restarting"), p.err:text())
  end))

  it("is called once, never while the loop runs, and rejects bad arguments", async(function()
    local p = P.luahost([[
local process = require "tcpserver.process"
local ioloop = require "tcpserver.ioloop"
local _, err = pcall(ioloop.current().run_sync, ioloop.current(), function()
  return process.fork_processes(2)
end)
print((err:match("[^\n]*"))) -- without run_sync's traceback
for _, args in ipairs {{"x"}, {2.5}, {2, -1}, {2, 0.5}} do
  print(select(2, pcall(process.fork_processes, table.unpack(args))))
end
print(process.task_id())
local id = process.fork_processes(1)
print(select(2, pcall(process.fork_processes, 1)))
os.exit(id)
]])
    local lines = p.out:all()
    assert.same({0, 0}, {p:wait()})
    assert.same({
      "fork_processes: cannot fork from a task or while the loop runs",
      "fork_processes: number of processes must be an integer or nil",
      "fork_processes: number of processes must be an integer or nil",
      "fork_processes: max_restarts must be a non-negative integer or nil",
      "fork_processes: max_restarts must be a non-negative integer or nil",
      "nil",
      "fork_processes: already called (this is task 0)",
    }, lines)
  end))

  -- P.DRAIN, printing "term <id>" when a worker gets SIGTERM.
  local DRAIN = P.DRAIN .. [[
require("tcpserver.ioloop").current():add_signal_handler("SIGTERM", function()
  print("term " .. require("tcpserver.process").task_id())
  io.stdout:flush()
end)
]] .. P.UP

  -- Tornado's process_test.py test_multi_process, under plain lua5.4:
  -- tasks 0 and 1 serve a socket bound before the fork, task 2 is the
  -- client that makes them exit.
  it("test_multi_process: exits 2, 3 and 4 are restarted with a new pid, 0 is not, "
     .. "and the parent exits 0", async(function()
    local p = P.lua([[
local process = require "tcpserver.process"
local netutil = require "tcpserver.netutil"
local ioloop = require "tcpserver.ioloop"
local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
local port = select(2, sock:getsockname())
local id = process.fork_processes(3, 3)
assert(id == process.task_id())
if id < 2 then
  local S = require("tcpserver").TCPServer:extend()
  function S:handle_stream(stream)
    local status = stream:read_until("\n"):match("^exit (%d+)")
    if status then os.exit(tonumber(status)) end
    stream:write(process.getpid() .. "\n")
  end
  S():add_sockets({sock})
  ioloop.current():start()
  return
end
sock:close()
local function fetch(line)
  local c = assert(require("tcpserver.tcpclient").connect("127.0.0.1", port))
  c:write(line .. "\n")
  local reply = c:read_until("\n")
  c:close()
  return reply and tonumber(reply)
end
ioloop.current():run_sync(function()
  fetch("exit 2") -- two processes exit abnormally
  fetch("exit 3")
  assert(fetch("pid")) -- they have been restarted: a new fetch works
  fetch("exit 0") -- not restarted
  local pid = fetch("pid") -- one process left: its pid changes
  fetch("exit 4")
  local pid2 = fetch("pid")
  assert(pid and pid2 and pid ~= pid2)
  fetch("exit 0") -- the last one, so that all shut down
  print("client done")
end)
]])
    assert.same({0, 0}, {p:wait()})
    assert.same({"client done"}, p.out:all())
    for status = 2, 4 do
      p.err:await("child [01] %(pid %d+%) exited with status " .. status .. ", restarting")
    end
    p.err:await("child 2 %(pid %d+%) exited normally")
    assert.is_nil(p.err:text():match("giving up"), p.err:text())
  end))

  it("leaves no orphans: killing the supervisor stops the workers", async(function()
    local p = P.luahost(DRAIN, {10})
    ups(p, 2)
    p:kill(9)
    assert.same({0, 9}, {p:wait()})
    -- stdout ends only when every worker has exited: each got SIGTERM
    -- (PR_SET_PDEATHSIG) and stopped gracefully
    p.out:all()
    p.out:await("^term 0$")
    p.out:await("^term 1$")
  end))

  describe("signals to the supervisor", function()
    -- Starts DRAIN with `shutdown_timeout` and a request in flight.
    local function drain_with_request(shutdown_timeout)
      local p = P.luahost(DRAIN, {shutdown_timeout})
      return p, P.request_in_flight(p, 2)
    end

    it("SIGTERM is forwarded; a request in flight finishes, then all exit 0", async(function()
      local p, c = drain_with_request(10)
      p:kill(15)
      p.out:await("^term 0$")
      p.out:await("^term 1$")
      -- the drain says what it waits for, and when it is over
      p.err:await("Shutting down: waiting for 1 connection %(shutdown_timeout 10 s%)$")
      p.err:await("Shutting down: no connections open$")
      c:write("finish\n")
      assert.equal("done finish\n", c:read_until("\n"))
      assert.same({nil, "closed", ""}, {c:read_until("\n")})
      assert.same({0, 0}, {p:wait()})
      p.err:await("Shut down: the last connection closed after [%d.]+ s$")
    end))

    it("SIGINT too, and shutdown_timeout ends a handler that does not finish", async(function()
      local p, c = drain_with_request(0.2)
      p:kill(2)
      -- the server closes the stream after shutdown_timeout: the handler's
      -- pending read fails, and what it writes then is not sent
      assert.same({nil, "closed", ""}, {c:read_until("\n")})
      assert.same({0, 0}, {p:wait()})
      p.err:await("shutdown_timeout %(0.2 s%) expired: closing 1 connection$")
    end))

    it("under plain lua5.4, workers forked by start(n) drain on SIGTERM too", async(function()
      local p = P.lua(P.DRAIN .. P.UP .. P.LOOP, {10})
      local c = P.request_in_flight(p, 2)
      p:kill(15)
      p.err:await("Shutting down: waiting for 1 connection %(shutdown_timeout 10 s%)$")
      c:write("finish\n")
      assert.equal("done finish\n", c:read_until("\n"))
      assert.same({0, 0}, {p:wait()})
      p.err:await("Shut down: the last connection closed after [%d.]+ s$")
    end))

    -- Each worker reads the version file when it starts (after the fork),
    -- so a reload shows in the replies: "<version> <pid>".
    local RELOAD = [[
local tcpserver = require "tcpserver"
local process = require "tcpserver.process"
local ioloop = require "tcpserver.ioloop"
local Server = tcpserver.TCPServer:extend()
local server = Server()
print("port " .. server:bind(0, "127.0.0.1"))
io.stdout:flush()
server:start(2)
local version = io.open(arg[1]):read("l")
if version == "broken" then error("this release is broken") end
function Server:handle_stream(stream)
  if stream:read_until("\n") then stream:write(version .. " " .. process.getpid() .. "\n") end
end
ioloop.current():add_signal_handler("SIGTERM", function()
  print("term " .. process.getpid())
  io.stdout:flush()
end)
print(("up %d %d %s"):format(process.task_id(), process.getpid(), version))
io.stdout:flush()
]]

    local function set_version(path, v)
      local f = assert(io.open(path, "w"))
      f:write(v, "\n")
      f:close()
    end

    it("SIGHUP replaces the workers one by one with reloaded code; a client "
       .. "connecting in a loop is never refused nor dropped (shared socket)", async(function()
      local version = P.tmpfile()
      finally(function() os.remove(version) end)
      set_version(version, "v1")
      local p = P.luahost(RELOAD, {version})
      local port = tonumber(p.out:await("^port (%d+)"))
      local old = {}
      for _ = 1, 2 do old[#old + 1] = p.out:await("^up %d (%d+) v1$") end
      local client = P.hammer(port)
      client:wait_requests(20)
      set_version(version, "v2")
      p:kill(1)
      for _ = 1, 2 do p.out:await("^up %d %d+ v2$") end
      for _, pid in ipairs(old) do p.out:await("^term " .. pid .. "$") end
      p.err:await("reload done")
      client:wait_requests(50)
      client:stop()
      assert.same({}, client.errors)
      assert.is_true(client.replies.v1 >= 20 and client.replies.v2 >= 1)
      p:kill(15)
      assert.same({0, 0}, {p:wait()})
    end))

    it("a reload whose new worker dies before it is ready keeps the old workers", async(function()
      local version = P.tmpfile()
      finally(function() os.remove(version) end)
      set_version(version, "v1")
      local p = P.luahost(RELOAD, {version})
      local port = tonumber(p.out:await("^port (%d+)"))
      local old = {}
      for _ = 1, 2 do old[p.out:await("^up %d (%d+) v1$")] = true end
      set_version(version, "broken")
      p:kill(1)
      p.err:await("this release is broken")
      p.err:await("reload: the new worker for task 0 %(pid %d+%) exited with status 1 before "
                  .. "it was ready; keeping the old workers")
      for _ = 1, 5 do
        local v, pid = assert(P.request(port, "hi\n")):match("(%S+) (%d+)")
        assert.equal("v1", v)
        assert.is_true(old[pid])
      end
      p:kill(15)
      assert.same({0, 0}, {p:wait()})
    end))
  end)

  describe("serves one port from forked workers", function()
    local HANDLER = [[
local tcpserver = require "tcpserver"
local process = require "tcpserver.process"
local netutil = require "tcpserver.netutil"
local Server = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
  stream:write(process.task_id() .. "\n")
end})
]]

    local function check(p, port, n)
      local ids = {}
      for _ = 1, n do ids[#ids + 1] = tonumber(p.out:await("^up (%d+)$")) end
      table.sort(ids)
      assert.same(n == 3 and {0, 1, 2} or {0, 1}, ids)
      for _ = 1, 5 do assert.matches("^%d\n$", P.request(port, "")) end
      p:kill(15)
      assert.same({0, 0}, {p:wait()})
    end

    it("with TCPServer:bind and start(3)", async(function()
      local p = P.luahost(HANDLER .. [[
local server = Server()
print("port " .. server:bind(0, "127.0.0.1"))
io.stdout:flush()
server:start(3)
print("up " .. process.task_id())
]])
      check(p, tonumber(p.out:await("^port (%d+)")), 3)
    end))

    it("with bind_sockets, fork_processes(3) and add_sockets", async(function()
      local p = P.luahost(HANDLER .. [[
local socks = netutil.bind_sockets(0, "127.0.0.1")
print("port " .. select(2, socks[1]:getsockname()))
io.stdout:flush()
process.fork_processes(3)
Server():add_sockets(socks)
print("up " .. process.task_id())
]])
      check(p, tonumber(p.out:await("^port (%d+)")), 3)
    end))

    it("with a reuse_port listen in each of three forked workers", async(function()
      local port = P.free_port()
      local p = P.luahost(HANDLER .. [[
process.fork_processes(3)
Server():listen(tonumber(arg[1]), "127.0.0.1", {reuse_port = true})
print("up " .. process.task_id())
]], {port})
      check(p, port, 3)
    end))

    it("with a unix socket bound before the fork", async(function()
      local path = os.tmpname()
      os.remove(path)
      finally(function() os.remove(path) end)
      local p = P.luahost(HANDLER .. [[
local sock = netutil.bind_unix_socket(arg[1])
process.fork_processes(2)
Server():add_sockets({sock})
print("up " .. process.task_id())
]], {path})
      for _ = 1, 2 do p.out:await("^up (%d+)$") end
      local out = P.python([[
import socket, sys
for _ in range(5):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    sys.stdout.write(s.makefile("rb").readline().decode())
    s.close()
]], path)
      assert.matches("^[01]\n[01]\n[01]\n[01]\n[01]\n$", out)
      p:kill(15)
      assert.same({0, 0}, {p:wait()})
    end))
  end)
end)
