local H = require "spec.helper"
local ioloop = require "tcpserver.ioloop"

local async = H.async
local loop = ioloop.current()

describe("ioloop", function()
  it("current() is one loop per process", function()
    assert.equal(ioloop.current(), ioloop.current())
  end)

  it("time() is monotonic seconds", function()
    local a = loop:time()
    local b = loop:time()
    assert.is_true(type(a) == "number" and b >= a)
  end)

  describe("run_sync", function()
    it("returns the function's results", function()
      assert.same({1, nil, "x"}, {loop:run_sync(function() return 1, nil, "x" end)})
    end)

    it("raises the function's error", function()
      assert.has_error(function() loop:run_sync(function() error("inner", 0) end) end)
      local ok, err = pcall(loop.run_sync, loop, function() error("inner") end)
      assert.is_false(ok)
      assert.matches("inner", err)
    end)

    it("raises when the timeout expires", function()
      local ok, err = pcall(loop.run_sync, loop, function() ioloop.sleep(0.2) end, 0.05)
      assert.is_false(ok)
      assert.matches("timed out after 0.05 seconds", err)
    end)

    it("refuses to nest", async(function()
      local ok, err = pcall(loop.run_sync, loop, function() end)
      assert.is_false(ok)
      assert.matches("already running", err)
    end))
  end)

  describe("call_later", function()
    it("calls with arguments, in order of their delays", async(function()
      local calls = {}
      loop:call_later(0.02, function(a, b) calls[#calls + 1] = a .. b end, "late", "!")
      loop:call_later(0, function(a) calls[#calls + 1] = a end, "soon")
      ioloop.sleep(0.05)
      assert.same({"soon", "late!"}, calls)
    end))

    it("does not call a cancelled callback", async(function()
      local called = false
      local handle = loop:call_later(0.01, function() called = true end)
      handle:cancel()
      handle:cancel()
      ioloop.sleep(0.03)
      assert.is_false(called)
    end))

    it("rejects bad arguments", function()
      assert.has_error(function() loop:call_later(-1, print) end,
                       "call_later: delay must be a non-negative number of seconds")
      assert.has_error(function() loop:call_later(1, 1) end,
                       "call_later: function expected, got number")
    end)

    it("logs an error raised in a callback and goes on", async(function()
      local logs, restore = H.capture_logs()
      local after = false
      loop:add_callback(function() error("cb failed") end)
      loop:call_later(0.01, function() after = true end)
      ioloop.sleep(0.03)
      restore()
      assert.is_true(after)
      assert.matches("cb failed", logs[1])
      assert.matches("stack traceback", logs[1])
    end))
  end)

  it("add_callback runs on the next iteration, not at once", async(function()
    local ran = false
    loop:add_callback(function() ran = true end)
    assert.is_false(ran)
    ioloop.sleep(0)
    assert.is_true(ran)
  end))

  it("spawn_callback runs a task that may wait", async(function()
    local result
    loop:spawn_callback(function(x)
      ioloop.sleep(0.01)
      result = x
    end, "spawned")
    H.wait_until(function() return result end)
    assert.equal("spawned", result)
  end))

  it("logs an error raised in a spawned task", async(function()
    local logs, restore = H.capture_logs()
    loop:spawn_callback(function() ioloop.sleep(0); error("task failed") end)
    H.wait_until(function() return #logs > 0 end)
    restore()
    assert.matches("task failed", logs[1])
    assert.matches("stack traceback", logs[1])
  end))

  it("sleep outside a task raises a clear error", function()
    assert.has_error(function() ioloop.sleep(0) end)
    local ok, err = pcall(ioloop.sleep, 0)
    assert.is_false(ok)
    assert.matches("must be called from a coroutine run by the loop", err)
  end)

  it("sleep waits about as long as asked", async(function()
    local t0 = loop:time()
    ioloop.sleep(0.05)
    assert.is_true(loop:time() - t0 >= 0.045)
  end))

  it("start runs until stop", function()
    local ticks = 0
    local pc
    pc = ioloop.PeriodicCallback(function()
      ticks = ticks + 1
      if ticks == 3 then pc:stop(); loop:stop() end
    end, 5)
    pc:start()
    assert.is_true(pc:is_running())
    loop:start()
    assert.equal(3, ticks)
    assert.is_false(pc:is_running())
  end)

  it("PeriodicCallback rejects a bad interval", function()
    assert.has_error(function() ioloop.PeriodicCallback(print, 0) end,
                     "PeriodicCallback: interval must be a positive number of milliseconds")
  end)
end)

-- Under the generational collector, tasks that ended after growing old
-- were walked by every minor collection and freed by none while the heap
-- did not double: after a wave of closed connections the memory stayed
-- and every later collection paid for it.
describe("ioloop under the generational collector", function()
  local SERVER = [[
local tcpserver = require "tcpserver"
local S = tcpserver.TCPServer:extend()
local server
function S:handle_stream(stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    local cmd, n = line:match("^(%u+) ?(%d*)")
    if cmd == "GARBAGE" then
      for i = 1, tonumber(n) do local _ = string.rep("x", 1000) .. i end
    elseif cmd == "MEM" then
      line = string.format("%d\n", collectgarbage("count") // 1)
    elseif cmd == "COUNT" then
      line = server:connection_count() .. "\n"
    end
    stream:write(line)
  end
end
server = S()
io.stdout:write(server:listen(0, "127.0.0.1"), "\n")
io.stdout:flush()
]]

  local function ask(c, line)
    assert(c:write(line .. "\n"))
    return assert(c:read_until("\n")):sub(1, -2)
  end

  it("frees the tasks of closed connections without waiting for the heap to double", async(function()
    local process = require "tcpserver.process"
    local tcpclient = require "tcpserver.tcpclient"
    local path = H.script_file(SERVER)
    local p = process.Subprocess({H.LUAHOST, path}, {stdout = "pipe"})
    finally(function() p:kill(9); os.remove(path) end)
    local port = tonumber(p.stdout:read_until("\n"))
    local ctl = assert(tcpclient.connect("127.0.0.1", port))
    local base = tonumber(ask(ctl, "MEM"))
    local wave = {}
    for i = 1, 500 do
      wave[i] = assert(tcpclient.connect("127.0.0.1", port))
      assert.equal("hi", ask(wave[i], "hi"))
    end
    ask(ctl, "GARBAGE 20000") -- minor collections age the wave's tasks
    local peak = tonumber(ask(ctl, "MEM"))
    for _, c in ipairs(wave) do c:close() end
    H.wait_until(function() return ask(ctl, "COUNT") == "1" end)
    ask(ctl, "GARBAGE 20000")
    local after = tonumber(ask(ctl, "MEM"))
    assert.is_true(peak - base > 500, "the wave took " .. (peak - base) .. " KiB")
    assert.is_true(after - base < (peak - base) / 2,
                   string.format("base %d KiB, peak %d, after %d", base, peak, after))
    ctl:close()
  end))
end)

-- Under plain lua5.4 the interpreter's own SIGINT handler only flags an
-- error for the next Lua instruction: a server blocked in the loop went
-- on serving, and the next connection got "interrupted!".
describe("ioloop signals under plain lua5.4", function()
  local P = require "spec.procs"
  after_each(P.cleanup)

  for _, sig in ipairs {{2, "SIGINT"}, {15, "SIGTERM"}} do
    it(sig[2] .. " stops a server gracefully once its loop runs", H.async(function()
      local p = P.lua(P.DRAIN .. P.UP .. P.LOOP, {10, 1})
      local c = P.request_in_flight(p, 1)
      p:kill(sig[1])
      p.err:await("Shutting down: waiting for 1 connection %(shutdown_timeout 10 s%)$")
      c:write("finish\n")
      assert.equal("done finish\n", c:read_until("\n"))
      assert.same({0, 0}, {p:wait()})
      p.err:await("Shut down: the last connection closed after [%d.]+ s$")
      assert.is_nil(p.err:text():match("interrupted"), p.err:text())
    end))
  end

  it("a script's own handler wins, for the signal it handles", H.async(function()
    local p = P.lua(P.DRAIN .. [[
require("tcpserver.ioloop").current():add_signal_handler("SIGINT", function()
  print("mine")
  io.stdout:flush()
end)
]] .. P.UP .. P.LOOP, {10, 1})
    local port = tonumber(p.out:await("^port (%d+)"))
    p.out:await("^up nil$")
    p:kill(2)
    p.out:await("^mine$")
    assert.equal("ok\n", P.request(port, "hi\n"))
    p:kill(15)
    assert.same({0, 0}, {p:wait()})
    p.err:await("Shutting down: no connections open$")
  end))

  it("the interpreter's own SIGINT handling is back once the loop returns", H.async(function()
    local p = P.lua([[
local ioloop = require "tcpserver.ioloop"
ioloop.current():run_sync(function() end)
print("looping")
io.stdout:flush()
while true do end
]])
    p.out:await("^looping$")
    p:kill(2)
    assert.same({1, 0}, {p:wait()})
    p.err:await("interrupted!")
  end))
end)

describe("Task handles", function()
  local locks = require "tcpserver.locks"
  local queues = require "tcpserver.queues"

  it("join gives the results, or nil and the error's message", async(function()
    local t = loop:spawn(function(a, b) ioloop.sleep(0.01) return a + b, "sum" end, 2, 3)
    assert.is_false(t:done())
    assert.same({true, 5, "sum"}, {t:join()})
    assert.is_true(t:done())
    assert.same({true, 5, "sum"}, {t:join()}) -- again, at once
    local logs, restore = H.capture_logs()
    local bad = loop:spawn(function() ioloop.sleep(0) error("broken", 0) end)
    assert.same({nil, "broken"}, {bad:join()})
    assert.same({}, logs) -- a joiner got it: not logged
    local lone = loop:spawn(function() ioloop.sleep(0) error("nobody listens", 0) end)
    H.wait_until(function() return lone:done() end)
    restore()
    assert.equal(1, #logs)
    assert.matches("^error: nobody listens\nstack traceback:", logs[1])
    assert.same({nil, "nobody listens"}, {lone:join()})
    assert.same({nil, "timeout"}, {loop:spawn(ioloop.sleep, 1):join(0.01)})
  end))

  it("kill closes the task's to-be-closed variables and its joiners get 'killed'", async(function()
    local closed, after = {}, false
    local t = loop:spawn(function()
      local _a <close> = setmetatable({}, {__close = function() closed[#closed + 1] = "outer" end})
      local function inner()
        local _b <close> = setmetatable({}, {__close = function() closed[#closed + 1] = "inner" end})
        ioloop.sleep(10)
      end
      inner()
      after = true
    end)
    local joiner = loop:spawn(function() return t:join() end)
    assert.is_true(t:kill())
    assert.same({"inner", "outer"}, closed)
    assert.is_true(t:done())
    assert.same({nil, "killed"}, {t:join()})
    assert.same({true, nil, "killed"}, {joiner:join()})
    assert.is_false(t:kill()) -- once
    ioloop.sleep(0.02)
    assert.is_false(after) -- never resumed again
    local me
    me = loop:spawn(function()
      ioloop.sleep(0)
      return pcall(me.kill, me)
    end)
    local _, ok, err = me:join()
    assert.is_false(ok)
    assert.matches("kill: a task cannot kill itself", err)
  end))

  it("kill cancels a stream read or write cleanly: another task uses the stream", async(function()
    local server, port = H.serve(function(_, stream)
      local reader = loop:spawn(function() return stream:read_until("\n") end)
      ioloop.sleep(0.01)
      assert.is_true(reader:kill())
      -- the stream is free: a second reader takes the line
      local line = stream:read_until("\n")
      stream:write("got " .. line)
      local big = ("x"):rep(8 * 1024 * 1024)
      local writer = loop:spawn(function() return stream:write(big) end) -- waits: nobody reads
      ioloop.sleep(0.01)
      assert.is_false(writer:done())
      assert.is_true(writer:kill())
      assert.is_true(stream:write("after\n")) -- writes go on (after what was queued)
    end)
    finally(function() server:stop() end)
    local c = H.connect(port)
    ioloop.sleep(0.05)
    c:write("line\n")
    assert.equal("got line\n", c:read_until("\n"))
    local rest = c:read_until("after\n", 16 * 1024 * 1024)
    assert.is_truthy(rest)
    c:close()
  end))

  it("a killed waiter takes no permit or item, even one handed to it already", async(function()
    local lock = locks.Lock()
    assert(lock:acquire())
    local a = loop:spawn(function() return lock:acquire() ~= nil end)
    local b = loop:spawn(function() return lock:acquire() ~= nil end)
    lock:release() -- handed to a, which has not run yet
    a:kill()
    assert.same({true, true}, {b:join(1)}) -- a's permit went on to b
    local q = queues.Queue()
    local g1 = loop:spawn(function() return q:get() end)
    local g2 = loop:spawn(function() return q:get() end)
    g1:kill() -- before anything comes: skipped
    q:put("one")
    assert.same({true, "one"}, {g2:join(1)})
  end))

  it("wait_any returns the first task to end, or nil, 'timeout'", async(function()
    local slow = loop:spawn(ioloop.sleep, 1)
    local fast = loop:spawn(ioloop.sleep, 0.01)
    assert.equal(fast, ioloop.wait_any({slow, fast}))
    assert.equal(fast, ioloop.wait_any({slow, fast})) -- ended already: at once
    assert.same({nil, "timeout"}, {ioloop.wait_any({slow}, 0.01)})
    slow:kill()
    assert.has_error(function() ioloop.wait_any({}) end, "wait_any: a non-empty list of tasks expected")
  end))
end)

describe("ioloop.with_timeout", function()
  local locks = require "tcpserver.locks"
  local queues = require "tcpserver.queues"

  it("gives every wait inside one deadline, and returns fn's results before it",
     async(function()
    assert.same({1, 2}, {ioloop.with_timeout(1, function() ioloop.sleep(0.001) return 1, 2 end)})
    local got = {}
    local r = {ioloop.with_timeout(0.05, function()
      got.sleep = {ioloop.sleep(10)} -- cut to the deadline
      got.after = {ioloop.sleep(0)}  -- the deadline has passed: at once
      return "late"
    end)}
    assert.same({nil, "timeout"}, got.sleep)
    assert.same({nil, "timeout"}, got.after)
    assert.same({nil, "timeout"}, r)
    assert.is_true(ioloop.sleep(0)) -- outside it, waits are as before
  end))

  it("holds for stream reads and writes, locks, queues and connects", async(function()
    local server, port = H.serve(function(_, stream) stream:read_until_close() end)
    finally(function() server:stop() end)
    local c = H.connect(port)
    local lock, q, cond = locks.Lock(), queues.Queue(), locks.Condition()
    assert(lock:acquire())
    local results = {}
    local t0 = ioloop.current():time()
    ioloop.with_timeout(0.05, function()
      results.read = {c:read_until("\n")}          -- the server never answers
      results.lock = {lock:acquire(10)}            -- its own timeout is later
      results.get = {q:get()}
      results.wait = {cond:wait()}
      results.event = {locks.Event():wait()}
      results.connect = {require("tcpserver.tcpclient").connect("127.0.0.1", port)}
    end)
    assert.is_true(ioloop.current():time() - t0 < 5)
    for what, r in pairs(results) do assert.same({nil, "timeout"}, r, what) end
    assert.is_false(c:closed()) -- a timed-out read leaves the stream usable
    c:write("still\n")
    assert.is_true(c:flush())
    c:close()
    lock:release()
  end))

  it("keeps the earlier deadline when nested, and restores the outer one", async(function()
    local inner_end, outer_end
    ioloop.with_timeout(0.05, function()
      ioloop.with_timeout(10, function()
        ioloop.sleep(10)
        inner_end = ioloop.current():time()
      end)
      outer_end = {ioloop.sleep(10)}
    end)
    assert.truthy(inner_end)
    assert.same({nil, "timeout"}, outer_end)
    local d
    ioloop.with_timeout(0.01, function()
      ioloop.with_timeout(10, function() end)
      d = {ioloop.sleep(1)} -- the outer deadline is back after the inner one
    end)
    assert.same({nil, "timeout"}, d)
    assert.is_nil(require("tcpserver.core").deadline())
  end))

  it("restores the deadline when fn raises, and refuses bad arguments", async(function()
    assert.has_error(function() ioloop.with_timeout(0.01, error, "boom", 0) end, "boom")
    assert.is_nil(require("tcpserver.core").deadline())
    assert.is_true(ioloop.sleep(0.02))
    assert.has_error(function() ioloop.with_timeout(-1, print) end,
                     "with_timeout: seconds must be a number >= 0")
  end))
end)

describe("review findings (tasks and deadlines)", function()
  it("a killed task's sleep or timed wait no longer keeps the loop running", async(function()
    local out = H.run({"lua5.4", "-e", [[
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "]] .. H.BUILD .. [[/?.so;" .. package.cpath
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local loop = ioloop.current()
local a = loop:spawn(ioloop.sleep, 3)
local b = loop:spawn(function() locks.Condition():wait(3) end)
local c = loop:spawn(function() locks.Event():wait(3) end)
loop:add_callback(function() a:kill(); b:kill(); c:kill() end)
local t0 = loop:time()
loop:start()
print(loop:time() - t0 < 1)
]]})
    assert.equal("true\n", out)
  end))

  it("takes a huge or infinite with_timeout as no deadline", async(function()
    local locks = require "tcpserver.locks"
    for _, t in ipairs {math.huge, 1e17, 2e9} do
      assert.is_true(ioloop.with_timeout(t, ioloop.sleep, 0.01), t)
      local c = locks.Condition()
      loop:add_callback(function() c:notify() end)
      assert.is_true(ioloop.with_timeout(t, c.wait, c), t)
    end
  end))

  it("gives a killed getter's item back: nothing is lost, the queue's front first", async(function()
    local queues = require "tcpserver.queues"
    local q = queues.Queue(1)
    local a = loop:spawn(function() return q:get() end)
    q:put("x") -- handed to a, which has not run
    a:kill()
    q:put_nowait("y")
    ioloop.sleep(0) -- a's wake finds it killed: "x" goes back, before "y"
    assert.same({"x", "y"}, {q:get_nowait(), q:get_nowait()})
  end))
end)
