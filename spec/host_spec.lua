local H = require "spec.helper"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async
local LUAHOST = H.LUAHOST

-- Starts `luahost script args...`; the script prints its port on stdout.
local function start(script, ...)
  local path = H.script_file(script)
  local p = process.Subprocess({LUAHOST, path, ...}, {stdout = "pipe", stderr = "pipe"})
  p.script = path
  return p
end

local ECHO = H.ECHO_SCRIPT

describe("luahost", function()
  it("runs the shutdown hooks on SIGTERM and stops once each is done", async(function()
    local p = start([[
local ioloop = require "tcpserver.ioloop"
ioloop.on_shutdown(function(done)
  print("hook") io.stdout:flush()
  ioloop.current():call_later(0.1, function() print("done") io.stdout:flush() done() end)
  return 5
end)
ioloop.current():add_callback(function() print("up") io.stdout:flush() end)
ioloop.current():call_later(30, function() end) -- keeps the loop running
]])
    assert.equal("up\n", p.stdout:read_until("\n"))
    p:kill(15)
    assert.equal("hook\ndone\n", p.stdout:read_until_close())
    assert.same({0, 0}, {p:wait_for_exit()})
  end))

  it("runs a script with arg and serves until SIGTERM, then exits 0", async(function()
    local p = start(ECHO, "first-arg")
    local port, a1 = p.stdout:read_until("\n"):match("(%d+) (%S*)")
    assert.equal("first-arg", a1)
    local c = assert(tcpclient.connect("127.0.0.1", tonumber(port)))
    c:write("via luahost\n")
    assert.equal("via luahost\n", c:read_until("\n"))
    c:write("slow\n")
    H.wait_until(function() return select(2, c:buffer_sizes()) == 0 end)
    p:kill(15)
    assert.equal("slow\n", c:read_until("\n")) -- the running handler finishes
    c:close()
    assert.same({0, 0}, {p:wait_for_exit()})
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", tonumber(port))})
    os.remove(p.script)
  end))

  it("stops on SIGINT too", async(function()
    local p = start(ECHO)
    p.stdout:read_until("\n")
    p:kill(2)
    assert.same({0, 0}, {p:wait_for_exit()})
    os.remove(p.script)
  end))

  it("exits when the script leaves nothing to do", async(function()
    local p = start([[print("done")]])
    assert.equal("done\n", p.stdout:read_until_close())
    assert.same({0, 0}, {p:wait_for_exit()})
    os.remove(p.script)
  end))

  it("prints the traceback of a script error and exits non-zero", async(function()
    local p = start([[local function f() error("script broke") end f()]])
    local err = p.stderr:read_until_close()
    local status = p:wait_for_exit()
    assert.equal(1, status)
    assert.matches("script broke", err)
    assert.matches("stack traceback", err)
    os.remove(p.script)
  end))

  it("documents its flags in --help and rejects unknown ones", async(function()
    local out, status = H.run({LUAHOST, "--help"})
    assert.equal(0, status)
    assert.matches("usage: luahost", out)
    local _, bad = H.run({LUAHOST, "--bogus", "x.lua"})
    assert.equal(2, bad)
  end))

  it("runs Lua's generational collector unless told --gc incremental", async(function()
    local p = start([[print(collectgarbage("incremental"))]])
    assert.equal("generational\n", p.stdout:read_until_close())
    p:wait_for_exit()
    os.remove(p.script)
    p = process.Subprocess({LUAHOST, "--gc", "incremental", "-e", [[print(collectgarbage("step") ~= nil)]],
                            "-e", [[print(collectgarbage("generational"))]], "/dev/null"}, {stdout = "pipe"})
    assert.equal("true\nincremental\n", p.stdout:read_until_close())
    assert.same({0, 0}, {p:wait_for_exit()})
    local _, bad = H.run({LUAHOST, "--gc", "fast", "x.lua"})
    assert.equal(2, bad)
  end))
end)

-- Deployment: luahost --workers, reloads, and sockets passed by systemd.
local P = require "spec.procs"

-- Replies "<version> <task id> <pid>"; each worker reads the version file
-- when the script runs, and prints "up <id> <pid> <version> <port>".
local WORKER = [[
local tcpserver = require "tcpserver"
local process = require "tcpserver.process"
local netutil = require "tcpserver.netutil"
local version = io.open(arg[1]):read("l")
local Server = tcpserver.TCPServer:extend()
function Server:handle_stream(stream)
  if stream:read_until("\n") then
    stream:write(("%s %s %d\n"):format(version, process.task_id(), process.getpid()))
  end
end
local server = Server()
local port
if arg[2] == "inherited" then
  local socks = netutil.inherited_sockets()
  port = select(2, socks[1]:getsockname())
  server:add_sockets(socks)
else
  port = server:listen(tonumber(arg[2]), "127.0.0.1")
end
print(("up %s %d %s %d"):format(process.task_id(), process.getpid(), version, port))
io.stdout:flush()
]]

local function version_file(v)
  local path = P.tmpfile(v .. "\n")
  finally(function() os.remove(path) end)
  return path
end

local function set_version(path, v)
  local f = assert(io.open(path, "w"))
  f:write(v, "\n")
  f:close()
end

-- Starts a reload and waits until the n new workers run `v` and the
-- supervisor is done; returns the new pids.
local function reload(p, path, n, v)
  set_version(path, v)
  p:kill(1)
  local pids = {}
  for _ = 1, n do pids[#pids + 1] = p.out:await("^up %d+ (%d+) " .. v .. " ") end
  p.err:await("reload done")
  return pids
end

-- Keeps clients connecting through reloads to v2 and v3 of `n` workers;
-- returns them stopped, with their replies and errors counted.
local function reload_twice_under_load(p, path, port, n)
  local client = P.hammer(port)
  client:wait_requests(10)
  reload(p, path, n, "v2")
  reload(p, path, n, "v3")
  client:wait_requests(20)
  client:stop()
  return client
end

describe("luahost --workers", function()
  after_each(P.cleanup)

  it("runs N copies of the script, each binding its own reuse_port socket", async(function()
    local port = P.free_port()
    local p = P.luahost(WORKER, {version_file("v1"), port}, {flags = {"--workers", "2"}})
    local ids = {}
    for _ = 1, 2 do
      local id, _, p2 = p.out:await("^up (%d+) (%d+) v1 (%d+)$")
      assert.equal(port, tonumber(p2))
      ids[#ids + 1] = tonumber(id)
    end
    table.sort(ids)
    assert.same({0, 1}, ids)
    for _ = 1, 4 do assert.matches("^v1 [01] %d+\n$", P.request(port, "hi\n")) end
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("SIGHUP re-runs the script in a new worker, which binds before the old "
     .. "one stops: a client connecting in a loop is never refused", async(function()
    local port = P.free_port()
    local path = version_file("v1")
    -- One worker: with more, another one's socket would hide a gap.
    local p = P.luahost(WORKER, {path, port}, {flags = {"-w", "1"}})
    p.out:await("^up 0 %d+ v1 ")
    local client = reload_twice_under_load(p, path, port, 1)
    -- Each worker has its own reuse_port socket: a connection the kernel
    -- queued on an old worker's socket in the instant it closes is reset
    -- (unless net.ipv4.tcp_migrate_req=1), so "closed" may show here, rarely;
    -- a refused connection never may.
    client.errors.closed = nil
    assert.same({}, client.errors)
    assert.is_true(client.replies.v1 >= 10 and client.replies.v3 >= 1)
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("SIGHUP replaces the workers with --stats-port on: the metrics port is "
     .. "handed over like any listener", async(function()
    -- each new worker exited 2 (its metrics port was the old one's, bound
    -- without reuse_port) and the old workers were kept: no deploy
    local port, stats_port = P.free_port(), nil -- luacheck: ignore 311
    repeat -- workers 0 and 1 serve metrics on stats_port and the next one
      stats_port = P.free_port()
      local next_free = stats_port + 1 ~= port and pcall(function()
        require("tcpserver.netutil").bind_sockets(stats_port + 1, "127.0.0.1")[1]:close()
      end)
    until next_free and stats_port ~= port
    local path = version_file("v1")
    local p = P.luahost(WORKER, {path, port}, {flags = {"-w", "2", "--stats-port", tostring(stats_port)}})
    local old = {}
    for _ = 1, 2 do old[#old + 1] = tonumber(p.out:await("^up %d+ (%d+) v1 ")) end
    local new = reload(p, path, 2, "v2")
    assert.is_nil(p.err:text():match("keeping the old workers"), p.err:text())
    for _, pid in ipairs(new) do
      for _, o in ipairs(old) do assert.not_equal(o, tonumber(pid)) end
    end
    for k = 0, 1 do -- each metrics port answers, from its new worker
      local out, status = H.run({"curl", "-sf", ("http://127.0.0.1:%d/metrics"):format(stats_port + k)})
      assert.equal(0, status)
      assert.matches('tcpserver_connections_open{task="' .. k .. '"}', out, 1, true)
    end
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("gives up after --max-restarts when the workers keep crashing", async(function()
    local p = P.luahost([[require("tcpserver.ioloop").current():add_callback(os.exit, 3)]], {},
                        {flags = {"--workers", "2", "--max-restarts", "2"}})
    assert.equal(1, p:wait())
    p.err:await("^luahost: fork_processes: too many child restarts %(2%), giving up")
  end))

  it("stops at once, with one line, when the script fails before its loop runs", async(function()
    local p = P.luahost([[error("broken at startup")]], {}, {flags = {"--workers", "2"}})
    assert.equal(1, p:wait())
    p.err:await("^luahost: fork_processes: worker [01] %(pid %d+%) failed before its loop ran: "
                .. ".*: broken at startup$")
    assert.is_nil(p.err:text():match("traceback"), p.err:text())
  end))

  it("rejects bad flag values", async(function()
    for _, argv in ipairs {{"--workers", "x", "s.lua"}, {"-w"}, {"--max-restarts", "3", "s.lua"},
                           {"--workers", "-1", "s.lua"}} do
      local p = process.Subprocess({LUAHOST, table.unpack(argv)}, {stderr = "pipe"})
      assert.matches("^luahost: ", p.stderr:read_until_close())
      assert.equal(2, p:wait_for_exit())
    end
  end))

  it("--help documents every flag that the parser accepts", async(function()
    local help = H.run({LUAHOST, "--help"})
    local source = assert(io.open("lua/tcpserver/host.lua")):read("a")
    local flags = 0
    for flag in source:gmatch('a == "(%-[%w-]*)"') do
      flags = flags + 1
      assert.is_truthy(help:find("%f[%S]" .. flag:gsub("%-", "%%-") .. "%f[%s,]"), flag)
    end
    assert.is_true(flags >= 8)
    assert.matches("SIGHUP", help)
    assert.matches("LISTEN_FDS", help)
  end))
end)

describe("luahost with systemd socket activation", function()
  after_each(P.cleanup)

  it("takes the sockets passed at fd 3.., names them and unsets the variables", async(function()
    local p = P.luahost([[
local tcpserver = require "tcpserver"
local netutil = require "tcpserver.netutil"
local socks = netutil.inherited_sockets()
print(#socks, socks[1].name, socks[2].name, os.getenv("LISTEN_FDS"), os.getenv("LISTEN_PID"),
      os.getenv("LISTEN_FDNAMES"), select(2, socks[1]:getsockname()), (select(2, socks[2]:getsockname())))
io.stdout:flush()
local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream, address)
  stream:write(tostring(address.port > 0) .. " " .. stream:read_until("\n"))
end})
Echo():add_sockets(socks)
]], {}, {launcher = P.systemd("2:web:admin")})
    local port1 = p.out:await("^port (%d+)$")
    local port2 = p.out:await("^port (%d+)$")
    assert.equal(("2\tweb\tadmin\tnil\tnil\tnil\t%s\t%s"):format(port1, port2), p.out:await("^(2\t.*)$"))
    assert.equal("true over systemd\n", P.request(tonumber(port1), "over systemd\n"))
    assert.equal("true second\n", P.request(tonumber(port2), "second\n"))
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("serves a unix socket passed that way", async(function()
    local path = os.tmpname()
    os.remove(path)
    finally(function() os.remove(path) end)
    local p = P.luahost([[
local tcpserver = require "tcpserver"
local socks = require("tcpserver.netutil").inherited_sockets()
local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream, address)
  stream:write(socks[1].name .. " " .. tostring(address) .. " " .. stream:read_until("\n"))
end})
Echo():add_sockets(socks)
print(socks[1]:getsockname())
io.stdout:flush()
]], {}, {launcher = P.systemd("unix:" .. path)})
    assert.equal(path .. "\t0\tunix", p.out:await("^(/.*)$"))
    local out = H.unix_line(path, "hello\n")
    assert.equal("local unix: hello\n", out)
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("keeps them for every worker: a reload is lossless and re-runs the script", async(function()
    local path = version_file("v1")
    local p = P.luahost(WORKER, {path, "inherited"},
                        {flags = {"--workers", "2"}, launcher = P.systemd("1:web")})
    local port = tonumber(p.out:await("^port (%d+)$"))
    for _ = 1, 2 do assert.equal(port, tonumber(p.out:await("^up %d+ %d+ v1 (%d+)$"))) end
    local client = reload_twice_under_load(p, path, port, 2)
    assert.same({}, client.errors)
    assert.is_true(client.replies.v1 >= 10 and client.replies.v3 >= 1)
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("ignores sockets passed to another pid and rejects what is not a listening socket",
     async(function()
    local show = [[print(#require("tcpserver.netutil").inherited_sockets(), os.getenv("LISTEN_FDS"))]]
    local p = P.luahost(show, {}, {launcher = P.systemd("env:1:1")})
    assert.same({"0\tnil"}, p.out:all())
    assert.equal(0, p:wait())
    p = P.luahost(show, {}, {launcher = P.systemd("env:0:self")})
    assert.same({"0\tnil"}, p.out:all())
    p = P.luahost(show, {}, {launcher = P.systemd("file")})
    assert.equal(2, p:wait())
    p.err:await("luahost: .*inherited_sockets: fd 3 is not a listening stream socket")
    p = P.luahost(show, {}, {launcher = P.systemd("env:1:self")})
    assert.equal(2, p:wait())
    p.err:await("luahost: .*inherited_sockets: fd 3 is not open")
    p = P.luahost(show, {}, {launcher = P.systemd("env:x:self")})
    assert.equal(2, p:wait())
    p.err:await("inherited_sockets: bad LISTEN_FDS 'x'")
  end))
end)

describe("luahost flags", function()
  after_each(P.cleanup)

  -- An echo that raises on "boom"; logs at every level once listening.
  local SCRIPT = [[
local log = require "tcpserver.log"
local S = require("tcpserver").TCPServer:extend()
function S:handle_stream(stream)
  local line = stream:read_until("\n")
  if line == "boom\n" then error("boom") end
  stream:write(line)
end
local port = S():listen(0, "127.0.0.1")
for _, level in ipairs {"debug", "info", "warning", "error"} do log[level]("at %s", level) end
print("port " .. port)
]]

  it("--version prints the module's version", async(function()
    local out, status = H.run({LUAHOST, "--version"})
    assert.equal(0, status)
    assert.equal("luahost (tcpserver) " .. require("tcpserver")._VERSION .. "\n", out)
  end))

  it("--log-level filters and --log-format json writes JSON lines", async(function()
    local p = P.luahost(SCRIPT, {}, {flags = {"--log-level", "warning", "--log-format", "json"}})
    p.out:await("^port (%d+)$")
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
    local out = H.python([[
import json, sys
for line in sys.argv[1].splitlines():
    d = json.loads(line)
    print(d["level"], d["message"], d["pid"] == int(sys.argv[2]), d["time"][-1])
]], table.concat(p.err:all(), "\n"), tostring(p.pid))
    assert.equal("warning at warning True Z\nerror at error True Z\n", out)
    p = P.luahost(SCRIPT, {}, {flags = {"--log-level", "debug"}})
    p.out:await("^port (%d+)$")
    p:kill(15)
    p:wait()
    local levels = {}
    for _, line in ipairs(p.err:all()) do
      levels[#levels + 1] = line:match("^%d+%-%d+%-%d+T%d+:%d+:%d+Z (%u+) %[" .. p.pid .. "%] at ")
    end
    assert.same({"DEBUG", "INFO", "WARNING", "ERROR"}, levels)
    local _, status, _, err = H.run({LUAHOST, "--log-level", "loud", "x.lua"})
    assert.equal(2, status)
    assert.equal("luahost: --log-level needs debug, info, warning or error (try --help)\n", err)
  end))

  -- Scrapes http://127.0.0.1:port/metrics with curl and parses it with
  -- the Prometheus client library's parser: {name = {labels, value}}.
  local function scrape(port)
    return H.python([==[
import subprocess, sys
from prometheus_client.parser import text_string_to_metric_families
text = subprocess.run(["curl", "-sf", "http://127.0.0.1:%s/metrics" % sys.argv[1]],
                      check=True, capture_output=True, text=True).stdout
for family in text_string_to_metric_families(text):
    for s in family.samples:
        print(family.type, s.name, ",".join("%s=%s" % kv for kv in sorted(s.labels.items())), int(s.value))
]==], tostring(port))
  end

  it("--stats-port serves server:stats() in Prometheus's text format", async(function()
    local stats_port = P.free_port()
    local p = P.luahost(SCRIPT, {}, {flags = {"--stats-port", tostring(stats_port), "--log-level", "error"}})
    local port = tonumber(p.out:await("^port (%d+)$"))
    assert.equal("fine\n", P.request(port, "fine\n"))
    local c = H.connect(port)
    c:write("boom\n")
    c:read_until_close()
    local out, status = scrape(stats_port)
    assert.equal(0, status)
    assert.equal(table.concat({
      "gauge tcpserver_connections_open  0",
      "counter tcpserver_connections_total  2",
      "counter tcpserver_bytes_in_total  %d",
      "counter tcpserver_bytes_out_total  %d",
      "counter tcpserver_handler_errors_total  1",
      "counter tcpserver_tls_handshake_failures_total  0", ""}, "\n"),
      (out:gsub("(_bytes_%w+_total  )%d+", "%1%%d")))
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))

  it("--stats-port under --workers: worker k on port N + k, labelled with its task id", async(function()
    local stats_port = P.free_port()
    local p = P.luahost(SCRIPT, {}, {flags = {"--workers", "1", "--stats-port", tostring(stats_port),
                                              "--log-level", "error"}})
    local port = tonumber(p.out:await("^port (%d+)$"))
    assert.equal("x\n", P.request(port, "x\n"))
    local out = scrape(stats_port)
    assert.matches("counter tcpserver_connections_total task=0 1\n", out)
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
  end))
end)
