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
