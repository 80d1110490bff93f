local H = require "spec.helper"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"

local async = H.async

describe("locks.Event", function()
  it("wakes every waiter when set", async(function()
    local ev, woken = locks.Event(), 0
    for _ = 1, 3 do
      ioloop.current():spawn(function() if ev:wait() then woken = woken + 1 end end)
    end
    assert.equal(0, woken)
    ev:set()
    assert.is_true(ev:wait())
    H.wait_until(function() return woken == 3 end)
    assert.is_true(ev:is_set())
  end))

  it("times out", async(function()
    local ev = locks.Event()
    assert.same({nil, "timeout"}, {ev:wait(0.02)})
    ev:set()
    ev:clear()
    assert.is_false(ev:is_set())
  end))

  it("does not wake twice when set and timed out in one iteration", async(function()
    local ev, wakes = locks.Event(), 0
    ioloop.current():spawn(function()
      ev:wait(0)
      wakes = wakes + 1
    end)
    ev:set()
    ioloop.sleep(0.02)
    assert.equal(1, wakes)
  end))

  it("raises outside a task", function()
    assert.has_error(function() locks.Event():wait() end, "Event:wait: must be called from a task")
  end)
end)

describe("locks.Condition", function()
  it("wakes 10,000 waiters in the order they waited, on one loop turn", async(function()
    local c, order, n = locks.Condition(), {}, 10000
    for i = 1, n do
      ioloop.current():spawn(function()
        assert(c:wait())
        order[#order + 1] = i
      end)
    end
    c:notify_all()
    assert.equal(0, #order) -- woken on the next iteration, not inside notify_all
    ioloop.sleep(0)
    assert.equal(n, #order)
    for i = 1, n do
      if order[i] ~= i then error(("waiter %d woke %dth"):format(i, order[i])) end
    end
  end))

  it("refuses a wait outside a task", function()
    assert.has_error(function() locks.Condition():wait() end, "Condition:wait: must be called from a task")
  end)
end)

describe("locks.Lock and Semaphore guards", function()
  it("release once when closed, and a manual release as well is a double release", async(function()
    local lock = locks.Lock()
    do
      local _guard <close> = assert(lock:acquire())
      assert.is_true(lock:locked())
    end
    assert.is_false(lock:locked())
    local ok, err = pcall(function()
      local _guard <close> = assert(lock:acquire())
      lock:release()
    end)
    assert.is_false(ok)
    assert.matches("release unlocked lock", err)
    local sem = locks.BoundedSemaphore(2)
    local g1, g2 = assert(sem:acquire()), assert(sem:acquire())
    g1:release()
    g1:release() -- once only
    assert.equal(1, sem.value)
    g2:release()
    assert.equal(2, sem.value)
  end))

  it("hand a released permit to the first waiter, which takes it even if another task asks first",
     async(function()
    local sem, got = locks.Semaphore(0), {}
    ioloop.current():spawn(function() got[#got + 1] = sem:acquire() and "waiter" end)
    sem:release()
    -- the permit is the waiter's now: a new acquire finds none
    assert.same({nil, "timeout"}, {sem:acquire(0)})
    ioloop.sleep(0)
    assert.same({"waiter"}, got)
  end))

  it("raise outside a task only when they must wait, and refuse bad arguments", function()
    local lock = locks.Lock()
    local guard = assert(lock:acquire()) -- free: no wait, no task needed
    assert.has_error(function() lock:acquire() end, "Lock:acquire: must be called from a task")
    guard:release()
    assert.has_error(function() locks.Semaphore(1.5) end, "Semaphore: value must be an integer")
    assert.has_error(function() locks.Condition():notify(-1) end,
                     "Condition:notify: n must be an integer >= 0")
  end)

  it("refuse to wait where the task cannot yield, leaving nothing queued", async(function()
    local lock = locks.Lock()
    assert(lock:acquire())
    local ok, err = pcall(table.sort, {1, 2}, function() return lock:acquire() end)
    assert.is_false(ok)
    assert.matches("cannot wait here", err)
    assert.is_false(lock.waiters:any())
    lock:release()
    assert.is_false(lock:locked())
  end))
end)
