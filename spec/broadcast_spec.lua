local H = require "spec.helper"
local broadcast = require "tcpserver.broadcast"
local ioloop = require "tcpserver.ioloop"

local async = H.async

describe("broadcast.Topic", function()
  it("queues each message for every subscriber, in order, and never waits", async(function()
    local topic = broadcast.Topic()
    local a, b = topic:subscribe(10, "drop"), topic:subscribe(10, "drop")
    local got = {}
    ioloop.current():spawn(function()
      for msg in a:messages() do got[#got + 1] = msg end
      got[#got + 1] = "end"
    end)
    assert.equal(2, topic:publish("one"))
    assert.equal(2, topic:publish("two"))
    assert.equal(1, topic:publish("three", b)) -- all but b
    assert.equal("one", b:get())
    assert.equal("two", b:get())
    assert.same({nil, "timeout"}, {b:get(0.01)})
    ioloop.sleep(0)
    a:close()
    ioloop.sleep(0)
    assert.same({"one", "two", "three", "end"}, got)
    assert.equal(1, topic:count())
  end))

  it("drops a subscriber whose queue is full under 'drop', once, and the others go on",
     async(function()
    local topic, dropped = broadcast.Topic(), {}
    local slow = topic:subscribe(3, "drop", function(s) dropped[#dropped + 1] = s end)
    local fast = topic:subscribe(3, "drop")
    for i = 1, 10 do
      topic:publish(i)
      assert.equal(i, fast:get())
    end
    assert.same({slow}, dropped)
    assert.equal(1, topic:count())
    -- what it had queued can still be read, then it is closed
    assert.same({1, 2, 3}, {slow:get(), slow:get(), slow:get()})
    assert.same({nil, "closed"}, {slow:get()})
    assert.is_false(slow:send("late"))
  end))

  it("makes room with the oldest under 'drop_oldest', counting what it dropped", function()
    local topic = broadcast.Topic()
    local sub = topic:subscribe(2, "drop_oldest")
    for i = 1, 5 do topic:publish(i) end
    assert.equal(3, sub.dropped)
    assert.same({4, 5}, {sub:get(), sub:get()})
  end)

  it("wakes a waiting get with 'closed' when the subscription closes", async(function()
    local topic = broadcast.Topic()
    local sub = topic:subscribe(1, "drop")
    local t = ioloop.current():spawn(function() return sub:get() end)
    sub:close()
    sub:close()
    assert.same({true, nil, "closed"}, {t:join(1)})
    assert.equal(0, topic:count())
  end))

  it("refuses bad arguments", function()
    local topic = broadcast.Topic()
    assert.has_error(function() topic:subscribe(0, "drop") end, "subscribe: maxsize must be a positive integer")
    assert.has_error(function() topic:subscribe(1, "block") end,
                     'subscribe: policy must be "drop" or "drop_oldest"')
    assert.has_error(function() topic:publish(nil) end, "publish: the message must not be nil")
  end)
end)
