-- Port of Tornado's tornado/test/locks_test.py (Tornado 6.x). Tornado's
-- class names are the describe() names and its test names the it() names.
--
-- Translated throughout:
--   a future Tornado makes without awaiting (`c.wait()`, `sem.acquire()`)
--     is a task started with T.future, which runs until it first waits;
--   a woken waiter runs on the loop's next iteration (DESIGN.md), where a
--     Tornado future is resolved inside notify() or release(): the checks
--     that follow such a call come after `ioloop.sleep(0)`;
--   a timeout returns nil, "timeout" where Tornado raises TimeoutError
--     (Condition.wait's False), and is given in seconds;
--   `with (yield sem.acquire())` is `local g <close> = sem:acquire()`;
--   ValueError and RuntimeError are errors with DESIGN.md's messages;
--   repr() is tostring().
--
-- Skipped, and why:
--   test_context_manager_async_await, test_acquire_fifo_async_with: the
--     same tests spelt with Python's `async with`, which Lua has no second
--     form of;
--   test_yield_sem, test_yield_lock, test_context_manager_misuse: they
--     check that a Semaphore or Lock used directly as a context manager
--     raises; a Lua table is not to-be-closed unless it has __close, and
--     neither has one (DESIGN.md), so `local x <close> = lock` raises in
--     Lua itself ("variable 'x' got a non-closable value"): covered by the
--     last test below instead.
local H = require "spec.helper"
local T = require "spec.tornado.util"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"

local async = H.async
local future = T.future

local function moment() ioloop.sleep(0) end

describe("ConditionTest", function()
  after_each(T.cleanup)
  local history
  before_each(function() history = {} end)

  -- Records how a Condition:wait resolved, as Tornado's record_done.
  local function record_done(c, key, timeout)
    return future(function()
      local ok = c:wait(timeout)
      history[#history + 1] = ok and key or "timeout"
    end)
  end

  it("test_repr", async(function()
    local c = locks.Condition()
    assert.matches("Condition", tostring(c))
    assert.no.matches("waiters", tostring(c))
    future(c.wait, c)
    assert.matches("waiters", tostring(c))
    c:notify_all()
  end))

  it("test_notify", async(function()
    local c = locks.Condition()
    ioloop.current():call_later(0.01, function() c:notify() end)
    assert.is_true(c:wait())
  end))

  it("test_notify_1", async(function()
    local c = locks.Condition()
    record_done(c, "wait1")
    record_done(c, "wait2")
    c:notify(1)
    moment()
    history[#history + 1] = "notify1"
    c:notify(1)
    moment()
    history[#history + 1] = "notify2"
    assert.same({"wait1", "notify1", "wait2", "notify2"}, history)
  end))

  it("test_notify_n", async(function()
    local c = locks.Condition()
    for i = 0, 5 do record_done(c, i) end
    c:notify(3)
    moment()
    assert.same({0, 1, 2}, history) -- in the order they waited
    c:notify(1)
    moment()
    assert.same({0, 1, 2, 3}, history)
    c:notify(2)
    moment()
    assert.same({0, 1, 2, 3, 4, 5}, history)
  end))

  it("test_notify_all", async(function()
    local c = locks.Condition()
    for i = 0, 3 do record_done(c, i) end
    c:notify_all()
    moment()
    history[#history + 1] = "notify_all"
    assert.same({0, 1, 2, 3, "notify_all"}, history)
  end))

  it("test_wait_timeout", async(function()
    local c = locks.Condition()
    local wait = future(c.wait, c, 0.01)
    ioloop.current():call_later(0.02, function() c:notify() end) -- too late
    ioloop.sleep(0.03)
    assert.same({nil, "timeout"}, {wait:result()})
  end))

  it("test_wait_timeout_preempted", async(function()
    local c = locks.Condition()
    ioloop.current():call_later(0.01, function() c:notify() end) -- before the timeout
    local wait = future(c.wait, c, 0.02)
    ioloop.sleep(0.03)
    assert.is_true(wait:result())
  end))

  it("test_notify_n_with_timeout", async(function()
    -- a timed-out waiter does not count against notify's n
    local c = locks.Condition()
    record_done(c, 0)
    record_done(c, 1, 0.01)
    record_done(c, 2)
    record_done(c, 3)
    ioloop.sleep(0.02)
    assert.same({"timeout"}, history)
    c:notify(2)
    ioloop.sleep(0.01)
    assert.same({"timeout", 0, 2}, history)
    c:notify()
    moment()
    assert.same({"timeout", 0, 2, 3}, history)
  end))

  it("test_notify_all_with_timeout", async(function()
    local c = locks.Condition()
    record_done(c, 0)
    record_done(c, 1, 0.01)
    record_done(c, 2)
    ioloop.sleep(0.02)
    assert.same({"timeout"}, history)
    c:notify_all()
    moment()
    assert.same({"timeout", 0, 2}, history)
  end))

  it("test_nested_notify", async(function()
    -- no notification is lost when a waiter notifies again
    local c = locks.Condition()
    local futures = {}
    for i = 1, 3 do
      futures[i] = future(function()
        c:wait()
        if i == 2 then c:notify() end
      end)
    end
    c:notify(2)
    ioloop.sleep(0.01)
    for i = 1, 3 do assert.is_true(futures[i]:done(), i) end
  end))

  it("test_garbage_collection", async(function()
    -- timed-out waiters are cleaned from the queue now and then
    local c = locks.Condition()
    for _ = 1, 101 do future(c.wait, c, 0.01) end
    local f = future(c.wait, c)
    assert.equal(102, c.waiters:count())
    ioloop.sleep(0.02)
    assert.equal(1, c.waiters:count())
    assert.is_false(f:done()) -- the last waiter is still waiting
    c:notify()
    moment()
    assert.is_true(f:done())
  end))
end)

describe("EventTest", function()
  after_each(T.cleanup)

  it("test_repr", function()
    local event = locks.Event()
    assert.matches("clear", tostring(event))
    assert.no.matches("set", tostring(event))
    event:set()
    assert.no.matches("clear", tostring(event))
    assert.matches("set", tostring(event))
  end)

  it("test_event", async(function()
    local e = locks.Event()
    local f0 = future(e.wait, e)
    e:set()
    local f1 = future(e.wait, e)
    e:clear()
    local f2 = future(e.wait, e)
    moment()
    assert.is_true(f0:done())
    assert.is_true(f1:done())
    assert.is_false(f2:done())
    e:set()
  end))

  it("test_event_timeout", async(function()
    local e = locks.Event()
    assert.same({nil, "timeout"}, {e:wait(0.01)})
    -- after a timed-out waiter, it works as before
    ioloop.current():call_later(0.01, function() e:set() end)
    assert.is_true(e:wait(1))
  end))

  it("test_event_set_multiple", function()
    local e = locks.Event()
    e:set()
    e:set()
    assert.is_true(e:is_set())
  end)

  it("test_event_wait_clear", async(function()
    local e = locks.Event()
    local f0 = future(e.wait, e)
    e:clear()
    local f1 = future(e.wait, e)
    e:set()
    moment()
    assert.is_true(f0:done())
    assert.is_true(f1:done())
  end))
end)

describe("SemaphoreTest", function()
  after_each(T.cleanup)

  it("test_negative_value", function()
    assert.has_error(function() locks.Semaphore(-1) end,
                     "Semaphore: semaphore initial value must be >= 0")
  end)

  it("test_repr", async(function()
    local sem = locks.Semaphore()
    assert.matches("Semaphore", tostring(sem))
    assert.matches("unlocked,value:1", tostring(sem), 1, true)
    assert(sem:acquire())
    assert.matches("locked", tostring(sem))
    assert.no.matches("waiters", tostring(sem))
    future(sem.acquire, sem)
    assert.matches("waiters", tostring(sem))
    sem:release()
  end))

  it("test_acquire", async(function()
    local sem = locks.Semaphore()
    local f0 = future(sem.acquire, sem)
    assert.is_true(f0:done())
    local f1 = future(sem.acquire, sem) -- waits for release()
    assert.is_false(f1:done())
    local f2 = future(sem.acquire, sem)
    sem:release()
    moment()
    assert.is_true(f1:done())
    assert.is_false(f2:done())
    sem:release()
    moment()
    assert.is_true(f2:done())
    sem:release()
    assert.is_true(future(sem.acquire, sem):done()) -- now acquire() is instant
    assert.is_false(sem.waiters:any())
  end))

  it("test_acquire_timeout", async(function()
    local sem = locks.Semaphore(2)
    assert(sem:acquire())
    assert(sem:acquire())
    local acquire = future(sem.acquire, sem, 0.01)
    ioloop.current():call_later(0.02, function() sem:release() end) -- too late
    ioloop.sleep(0.3)
    assert.same({nil, "timeout"}, {acquire:result()})
    future(sem.acquire, sem)
    local f = future(sem.acquire, sem)
    assert.is_false(f:done())
    sem:release()
    moment()
    assert.is_true(f:done())
  end))

  it("test_acquire_timeout_preempted", async(function()
    local sem = locks.Semaphore(1)
    assert(sem:acquire())
    ioloop.current():call_later(0.01, function() sem:release() end) -- before the timeout
    local acquire = future(sem.acquire, sem, 0.02)
    ioloop.sleep(0.03)
    assert.is_truthy(acquire:result()) -- a guard, no timeout
  end))

  it("test_release_unacquired", async(function()
    -- unbounded releases are allowed and add to the value
    local sem = locks.Semaphore()
    sem:release()
    sem:release()
    for _ = 1, 3 do assert.is_true(future(sem.acquire, sem):done()) end
    assert.is_false(future(sem.acquire, sem):done())
    sem:release()
  end))

  it("test_garbage_collection", async(function()
    local sem = locks.Semaphore(0)
    local futures = {}
    for i = 1, 101 do futures[i] = future(sem.acquire, sem, 0.01) end
    local f = future(sem.acquire, sem)
    assert.equal(102, sem.waiters:count())
    ioloop.sleep(0.02)
    assert.equal(1, sem.waiters:count())
    assert.is_false(f:done())
    sem:release()
    moment()
    assert.is_true(f:done())
    for _, t in ipairs(futures) do assert.same({nil, "timeout"}, {t:result()}) end
  end))
end)

describe("SemaphoreContextManagerTest", function()
  after_each(T.cleanup)

  it("test_context_manager", async(function()
    local sem = locks.Semaphore()
    do
      local _guard <close> = assert(sem:acquire())
      assert.is_true(sem:locked())
    end
    assert.is_true(future(sem.acquire, sem):done()) -- released, acquired again
  end))

  it("test_context_manager_exception", async(function()
    local sem = locks.Semaphore()
    local ok = pcall(function()
      local _guard <close> = assert(sem:acquire())
      error("ZeroDivisionError")
    end)
    assert.is_false(ok)
    assert.is_true(future(sem.acquire, sem):done())
  end))

  it("test_context_manager_timeout", async(function()
    local sem = locks.Semaphore()
    do local _guard <close> = assert(sem:acquire(0.01)) end
    assert.is_true(future(sem.acquire, sem):done())
  end))

  it("test_context_manager_timeout_error", async(function()
    local sem = locks.Semaphore(0)
    assert.same({nil, "timeout"}, {sem:acquire(0.01)})
    assert.is_false(future(sem.acquire, sem):done()) -- still 0
    sem:release()
  end))

  it("test_context_manager_contended", async(function()
    local sem = locks.Semaphore()
    local history = {}
    local function f(index)
      local _guard <close> = assert(sem:acquire())
      history[#history + 1] = "acquired " .. index
      ioloop.sleep(0.01)
      history[#history + 1] = "release " .. index
    end
    local a, b = future(f, 0), future(f, 1)
    a:result()
    b:result()
    assert.same({"acquired 0", "release 0", "acquired 1", "release 1"}, history)
  end))

  it("a Semaphore or Lock is not itself to-be-closed (test_context_manager_misuse)", function()
    for _, lock in ipairs {locks.Semaphore(), locks.Lock()} do
      local ok, err = pcall(load("local lock = ... local x <close> = lock"), lock)
      assert.is_false(ok)
      assert.matches("non%-closable value", err)
    end
  end)
end)

describe("BoundedSemaphoreTest", function()
  after_each(T.cleanup)

  it("test_release_unacquired", async(function()
    local sem = locks.BoundedSemaphore()
    assert.has_error(function() sem:release() end, "Semaphore released too many times")
    assert(sem:acquire()) -- value 0
    local f = future(sem.acquire, sem)
    assert.is_false(f:done())
    sem:release()
    moment()
    assert.is_true(f:done())
    sem:release() -- value 1
    assert.has_error(function() sem:release() end, "Semaphore released too many times")
  end))
end)

describe("LockTests", function()
  after_each(T.cleanup)

  it("test_repr", async(function()
    local lock = locks.Lock()
    assert.matches("unlocked", tostring(lock))
    assert(lock:acquire())
    assert.matches("locked", tostring(lock))
    lock:release()
  end))

  it("test_acquire_release", async(function()
    local lock = locks.Lock()
    assert.is_true(future(lock.acquire, lock):done())
    local f = future(lock.acquire, lock)
    assert.is_false(f:done())
    lock:release()
    moment()
    assert.is_true(f:done())
  end))

  it("test_acquire_fifo", async(function()
    local lock = locks.Lock()
    assert.is_true(future(lock.acquire, lock):done())
    local history, futures = {}, {}
    for i = 0, 4 do
      futures[#futures + 1] = future(function()
        local _guard <close> = assert(lock:acquire())
        history[#history + 1] = i
      end)
    end
    for _, f in ipairs(futures) do assert.is_false(f:done()) end
    lock:release()
    for _, f in ipairs(futures) do f:result() end
    assert.same({0, 1, 2, 3, 4}, history)
  end))

  it("test_acquire_timeout", async(function()
    local lock = locks.Lock()
    assert(lock:acquire())
    assert.same({nil, "timeout"}, {lock:acquire(0.01)})
    assert.is_false(future(lock.acquire, lock):done()) -- still locked
    lock:release()
  end))

  it("test_multi_release", async(function()
    local lock = locks.Lock()
    assert.has_error(function() lock:release() end, "release unlocked lock")
    assert(lock:acquire())
    lock:release()
    assert.has_error(function() lock:release() end, "release unlocked lock")
  end))
end)
