-- Port of Tornado's tornado/test/tcpserver_test.py (Tornado 6.x, master).
-- Tornado's class names are the describe() names and its test names the
-- it() names. The multi-process tests run their script under
-- build/luahost (spec/procs.lua) as Tornado runs a fresh interpreter; the
-- busted process itself never forks.
--
-- Skipped: nothing. Translated: a handler "coroutine" is handle_stream
-- itself (every handler runs in its own task), so
-- test_handle_stream_coroutine_logging and
-- test_handle_stream_native_coroutine test that handler; 1 / 0 is Lua's
-- integer division by zero (1 // 0), which raises (1 / 0 is inf in Lua). Tornado's
-- TestMultiprocess asserts an empty stderr; the supervisor logs its
-- children at INFO here, so the check is that stderr has no WARNING or
-- ERROR line.
local H = require "spec.helper"
local P = require "spec.procs"
local T = require "spec.tornado.util"
local netutil = require "tcpserver.netutil"
local tcpserver = require "tcpserver"
local tcpclient = require "tcpserver.tcpclient"
local testing = require "tcpserver.testing"

local async = H.async

-- Tests that fail because of a core defect (see spec/tornado/util.lua:
-- known_failures): a failure is pending, a pass asks to remove the entry.
-- Empty now: stop() frees the port before it returns (was test_stop_twice).
local KNOWN_FAIL = {}
local known = T.known_failures(KNOWN_FAIL, function(msg) pending(msg) end)

describe("TCPServerTest", function()
  it("test_handle_stream_coroutine_logging", async(function()
    -- An error raised by handle_stream is logged (with its traceback).
    local logs, restore = H.capture_logs()
    local Server = tcpserver.TCPServer:extend()
    function Server:handle_stream(stream) -- luacheck: ignore 212
      stream:read_bytes(#"hello")
      stream:close()
      return 1 // 0
    end
    local sock, port = testing.bind_unused_port()
    local server = Server()
    server:add_socket(sock)
    local client = assert(tcpclient.connect("localhost", port))
    assert.is_true(client:write("hello"))
    assert.equal("", client:read_until_close())
    H.wait_until(function() return #logs > 0 end)
    server:stop()
    client:close()
    restore()
    assert.equal(1, #logs)
    assert.matches("^error: Uncaught error in handle_stream for 127%.0%.0%.1:%d+: "
                   .. "spec/tornado/tcpserver_spec%.lua:%d+: attempt to divide by zero\n", logs[1])
    assert.matches("stack traceback", logs[1])
  end))

  it("test_handle_stream_native_coroutine", async(function()
    local Server = tcpserver.TCPServer:extend()
    function Server:handle_stream(stream) -- luacheck: ignore 212
      stream:write("data")
      stream:close()
    end
    local sock, port = testing.bind_unused_port()
    local server = Server()
    server:add_socket(sock)
    local client = assert(tcpclient.connect("localhost", port))
    assert.equal("data", client:read_until_close())
    server:stop()
    client:close()
  end))

  it("test_stop_twice", async(function()
    known("TCPServerTest test_stop_twice", function()
      local sock, port = testing.bind_unused_port()
      local server = tcpserver.TCPServer()
      server:add_socket(sock)
      server:stop()
      server:stop()
      -- Stopped: the socket is closed (Tornado's stop() closes it), so the
      -- port can be bound again at once.
      netutil.bind_sockets(port, "127.0.0.1")[1]:close()
    end)
  end))

  it("test_stop_in_callback", async(function()
    -- Tornado #2069: stop() in a handler while the loop has more accepts
    -- queued for the same iteration must not hit a closed descriptor.
    local logs, restore = H.capture_logs()
    local server
    local Server = tcpserver.TCPServer:extend()
    function Server:handle_stream(stream) -- luacheck: ignore 212
      server:stop()
      stream:read_until_close()
    end
    local sock, port = testing.bind_unused_port()
    server = Server()
    server:add_socket(sock)
    local N = 40
    local connected, done = {}, 0
    for _ = 1, N do
      H.loop:spawn(function()
        local c = tcpclient.connect("localhost", port, {timeout = 5})
        if c then connected[#connected + 1] = c end
        done = done + 1
      end)
    end
    H.wait_until(function() return done == N end)
    assert.is_true(#connected > 0, "all clients failed connecting")
    for _, c in ipairs(connected) do c:close() end
    -- Where Tornado's tearDown would re-raise an EBADF from the loop, the
    -- log would show it here.
    restore()
    assert.same({}, logs)
  end))
end)

describe("TestMultiprocess", function()
  after_each(P.cleanup)

  -- Runs `code` under luahost (Tornado: a fresh interpreter); the script
  -- prints its task id(s), one line each. Returns the sorted output, after checking the
  -- exit status and that nothing was logged as a warning or an error.
  local function run_subproc(code)
    local p = P.luahost(code)
    local out = table.concat(p.out:all())
    local err = p.err:all()
    assert.same({0, 0}, {p:wait()})
    for _, line in ipairs(err) do
      assert.is_nil(line:match(" WARNING ") or line:match(" ERROR ") or line:match("^luahost:"), line)
    end
    local chars = {}
    for c in out:gmatch(".") do chars[#chars + 1] = c end
    table.sort(chars)
    return table.concat(chars)
  end

  it("test_listen_single", async(function()
    assert.equal("012", run_subproc([[
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
ioloop.current():run_sync(function()
  local server = tcpserver.TCPServer()
  server:listen(0, "127.0.0.1")
  server:stop()
end)
print("012")
]]))
  end))

  it("test_bind_start", async(function()
    assert.equal("012", run_subproc([[
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local process = require "tcpserver.process"
local server = tcpserver.TCPServer()
server:bind(0, "127.0.0.1")
server:start(3)
ioloop.current():run_sync(function() end)
print(process.task_id())
io.stdout:flush()
os.exit(0)
]]))
  end))

  it("test_add_sockets", async(function()
    assert.equal("012", run_subproc([[
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local sockets = netutil.bind_sockets(0, "127.0.0.1")
process.fork_processes(3)
ioloop.current():run_sync(function()
  local server = tcpserver.TCPServer()
  server:add_sockets(sockets)
end)
print(process.task_id())
io.stdout:flush()
os.exit(0)
]]))
  end))

  it("test_listen_multi_reuse_port", async(function()
    assert.equal("012", run_subproc([[
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
-- A port that can be bound several times.
local sock = netutil.bind_sockets(0, "127.0.0.1", {family = "inet", reuse_port = true})[1]
local _, port = sock:getsockname()
process.fork_processes(3)
ioloop.current():run_sync(function()
  local server = tcpserver.TCPServer()
  server:listen(port, "127.0.0.1", {reuse_port = true})
end)
print(process.task_id())
io.stdout:flush()
os.exit(0)
]]))
  end))
end)
