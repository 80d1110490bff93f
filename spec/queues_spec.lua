local H = require "spec.helper"
local ioloop = require "tcpserver.ioloop"
local queues = require "tcpserver.queues"

local async = H.async

describe("queues.Queue", function()
  it("returns at once when it need not wait, outside a task too", function()
    local q = queues.Queue(2)
    assert.is_true(q:put("a"))
    assert.is_true(q:put_nowait("b"))
    assert.same({nil, "full"}, {q:put_nowait("c")})
    assert.is_true(q:full())
    assert.equal("a", q:get())
    assert.equal("b", q:get_nowait())
    assert.same({nil, "empty"}, {q:get_nowait()})
    assert.has_error(function() q:get() end, "get: must be called from a task")
  end)

  it("puts its producers into backpressure while full", async(function()
    local q, produced = queues.Queue(4), 0
    ioloop.current():spawn(function()
      for i = 1, 100 do
        q:put(i)
        produced = i
      end
    end)
    assert.equal(4, produced) -- the fifth put waits
    assert.equal(4, q:qsize())
    for i = 1, 100 do assert.equal(i, q:get()) end
    ioloop.sleep(0)
    assert.equal(100, produced)
  end))

  it("hands a put to a waiting getter and a waiting putter's item to a get", async(function()
    local q, got = queues.Queue(1), nil
    ioloop.current():spawn(function() got = q:get() end)
    q:put_nowait("direct")
    assert.is_true(q:empty()) -- the item went to the getter, not the queue
    ioloop.sleep(0)
    assert.equal("direct", got)
    q:put_nowait(1)
    local done = false
    ioloop.current():spawn(function() done = q:put(2) end)
    assert.equal(1, q:get_nowait())
    assert.equal(1, q:qsize()) -- the putter's item is in already
    assert.equal(2, q:get_nowait())
    ioloop.sleep(0)
    assert.is_true(done)
  end))

  it("refuses nil items, bad sizes and bad timeouts", async(function()
    local q = queues.Queue()
    assert.has_error(function() q:put(nil) end, "put: the item must not be nil")
    assert.has_error(function() q:put_nowait(nil) end, "put: the item must not be nil")
    assert.has_error(function() queues.Queue("3") end,
                     "Queue: maxsize must be an integer >= 0 (0: unbounded)")
    assert.has_error(function() q:get(-1) end, "get: timeout must be a number of seconds (0 or more)")
    assert.has_error(function() queues.PriorityQueue(0, 5) end, "PriorityQueue: less must be a function")
  end))

  it("iterates with items(), waiting for each item", async(function()
    local q, seen = queues.Queue(), {}
    ioloop.current():spawn(function()
      for item in q:items() do seen[#seen + 1] = item end
    end)
    for i = 1, 3 do q:put(i) end
    ioloop.sleep(0)
    assert.same({1, 2, 3}, seen)
  end))
end)

describe("queues.PriorityQueue", function()
  it("gives the smallest first, by < or by less", function()
    local q = queues.PriorityQueue()
    for _, v in ipairs {5, 1, 4, 2, 3, 9, 0} do q:put_nowait(v) end
    local out = {}
    while not q:empty() do out[#out + 1] = q:get_nowait() end
    assert.same({0, 1, 2, 3, 4, 5, 9}, out)
    q = queues.PriorityQueue(0, function(a, b) return a > b end)
    for v = 1, 5 do q:put_nowait(v) end
    assert.equal(5, q:get_nowait())
  end)
end)

describe("queues.LifoQueue", function()
  it("gives the newest first", function()
    local q = queues.LifoQueue()
    for v = 1, 3 do q:put_nowait(v) end
    assert.same({3, 2, 1}, {q:get_nowait(), q:get_nowait(), q:get_nowait()})
  end)
end)
