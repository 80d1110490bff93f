-- Port of Tornado's tornado/test/queues_test.py (Tornado 6.x). Tornado's
-- class names are the describe() names and its test names the it() names.
--
-- Translated throughout (as in spec/tornado/locks_spec.lua): a future
-- Tornado makes without awaiting is a task started with T.future; a woken
-- waiter runs on the loop's next iteration, so checks after a wake come
-- after `ioloop.sleep(0)`; QueueEmpty and QueueFull are nil, "empty" and
-- nil, "full"; TimeoutError is nil, "timeout"; put(nil) raises (an item is
-- never nil in Lua), so the tests' None items are `true`; timeouts are
-- seconds; `len(q._getters)` is q.getters:count().
--
-- Skipped, and why:
--   test_float_maxsize: maxsize must be an integer here (DESIGN.md: "a
--     number >= 0 ... anything else raises"); Python's rounding down of
--     1.3 has no counterpart. test_maxsize checks the refusal instead.
--   test_get_clears_timed_out_putters, test_get_clears_timed_out_getters,
--     test_put_clears_timed_out_putters, test_put_clears_timed_out_getters:
--     their counts pin when Tornado prunes timed-out waiters (at each put
--     and get); ours are pruned from the front at each wake and packed
--     after 100 timeouts (as Tornado's Condition does, see
--     test_garbage_collection in locks_spec). What they check of behaviour
--     (a timed-out waiter takes nothing, the live one after it is served)
--     is kept in "timed-out waiters take nothing" below.
local H = require "spec.helper"
local T = require "spec.tornado.util"
local ioloop = require "tcpserver.ioloop"
local queues = require "tcpserver.queues"

local async = H.async
local future = T.future

local function moment() ioloop.sleep(0) end

describe("QueueBasicTest", function()
  after_each(T.cleanup)

  it("test_repr_and_str", async(function()
    local q = queues.Queue(1)
    future(q.get, q)
    local s = tostring(q)
    assert.matches("^<Queue", s)
    assert.matches("maxsize=1", s)
    assert.matches("getters[1]", s, 1, true)
    assert.no.matches("putters", s)
    assert.no.matches("tasks", s)
    q:put(true) -- to the getter
    q:put(true)
    future(q.put, q, true) -- now the queue is full: this putter waits
    moment()
    s = tostring(q)
    assert.no.matches("getters", s)
    assert.matches("putters[1]", s, 1, true)
    assert.matches("tasks=2", s)
    q:get_nowait()
  end))

  it("test_order", function()
    local q = queues.Queue()
    for _, i in ipairs {1, 3, 2} do q:put_nowait(i) end
    local items = {}
    for _ = 1, 3 do items[#items + 1] = q:get_nowait() end
    assert.same({1, 3, 2}, items)
  end)

  it("test_maxsize", async(function()
    assert.has_error(function() queues.Queue(-1) end,
                     "Queue: maxsize must be an integer >= 0 (0: unbounded)")
    assert.has_error(function() queues.Queue(1.3) end,
                     "Queue: maxsize must be an integer >= 0 (0: unbounded)")
    local q = queues.Queue(2)
    assert.is_true(q:empty())
    assert.is_false(q:full())
    assert.equal(2, q:maxsize())
    assert.is_true(future(q.put, q, 0):done())
    assert.is_true(future(q.put, q, 1):done())
    assert.is_false(q:empty())
    assert.is_true(q:full())
    local put2 = future(q.put, q, 2)
    assert.is_false(put2:done())
    assert.equal(0, q:get()) -- makes room
    moment()
    assert.is_true(put2:done())
    assert.is_false(q:empty())
    assert.is_true(q:full())
  end))
end)

describe("QueueGetTest", function()
  after_each(T.cleanup)

  it("test_blocking_get", async(function()
    local q = queues.Queue()
    q:put_nowait(0)
    assert.equal(0, q:get())
  end))

  it("test_nonblocking_get", function()
    local q = queues.Queue()
    q:put_nowait(0)
    assert.equal(0, q:get_nowait())
  end)

  it("test_nonblocking_get_exception", function()
    assert.same({nil, "empty"}, {queues.Queue():get_nowait()})
  end)

  it("test_get_with_putters", async(function()
    local q = queues.Queue(1)
    q:put_nowait(0)
    local put = future(q.put, q, 1)
    assert.equal(0, q:get())
    assert.is_true(put:result())
  end))

  it("test_blocking_get_wait", async(function()
    local q = queues.Queue()
    q:put(0)
    ioloop.current():call_later(0.01, function() q:put(1) end)
    ioloop.current():call_later(0.02, function() q:put(2) end)
    assert.equal(0, q:get(1))
    assert.equal(1, q:get(1))
  end))

  it("test_get_timeout", async(function()
    local q = queues.Queue()
    local get_timeout = future(q.get, q, 0.01)
    local get = future(q.get, q)
    assert.same({nil, "timeout"}, {get_timeout:result()})
    q:put_nowait(0)
    assert.equal(0, get:result())
  end))

  it("timed-out waiters take nothing (test_*_clears_timed_out_*)", async(function()
    local q = queues.Queue(1)
    local putters = {}
    for i = 0, 9 do putters[#putters + 1] = future(q.put, q, i, 0.01) end -- the first succeeds
    local put = future(q.put, q, 10)
    ioloop.sleep(0.02)
    assert.is_false(put:done()) -- the last waiter is still waiting
    assert.equal(0, q:get())
    assert.equal(10, q:get()) -- the timed-out putters' items never went in
    for i = 2, 10 do assert.same({nil, "timeout"}, {putters[i]:result()}) end
    local getters = {}
    for _ = 1, 10 do getters[#getters + 1] = future(q.get, q, 0.01) end
    local get = future(q.get, q)
    ioloop.sleep(0.02)
    q:put(0)
    assert.equal(0, get:result())
    for _, g in ipairs(getters) do assert.same({nil, "timeout"}, {g:result()}) end
  end))
end)

describe("QueuePutTest", function()
  after_each(T.cleanup)

  it("test_blocking_put", async(function()
    local q = queues.Queue()
    q:put(0)
    assert.equal(0, q:get_nowait())
  end))

  it("test_nonblocking_put_exception", async(function()
    local q = queues.Queue(1)
    q:put(0)
    assert.same({nil, "full"}, {q:put_nowait(1)})
  end))

  it("test_put_with_getters", async(function()
    local q = queues.Queue()
    local get0 = future(q.get, q)
    local get1 = future(q.get, q)
    q:put(0)
    assert.equal(0, get0:result())
    q:put(1)
    assert.equal(1, get1:result())
  end))

  it("test_nonblocking_put_with_getters", async(function()
    local q = queues.Queue()
    local get0 = future(q.get, q)
    local get1 = future(q.get, q)
    q:put_nowait(0)
    assert.is_false(get0:done()) -- put_nowait does not unblock the getter at once
    moment()
    assert.equal(0, get0:result())
    q:put_nowait(1)
    moment()
    assert.equal(1, get1:result())
  end))

  it("test_blocking_put_wait", async(function()
    local q = queues.Queue(1)
    q:put_nowait(0)
    ioloop.current():call_later(0.01, function() q:get() end)
    ioloop.current():call_later(0.02, function() q:get() end)
    local futures = {future(q.put, q, 0), future(q.put, q, 1)}
    for _, f in ipairs(futures) do assert.is_false(f:done()) end
    for _, f in ipairs(futures) do assert.is_true(f:result()) end
  end))

  it("test_put_timeout", async(function()
    local q = queues.Queue(1)
    q:put_nowait(0) -- now it is full
    local put_timeout = future(q.put, q, 1, 0.01)
    local put = future(q.put, q, 2)
    assert.same({nil, "timeout"}, {put_timeout:result()})
    assert.equal(0, q:get_nowait())
    assert.equal(2, q:get()) -- 1 never went in
    assert.is_true(put:result()) -- the get unblocked this putter
  end))
end)

-- Tornado runs QueueJoinTest for each kind of queue.
local KINDS = {
  {"QueueJoinTest", queues.Queue},
  {"PriorityQueueJoinTest", queues.PriorityQueue},
  {"LifoQueueJoinTest", queues.LifoQueue},
}

for _, kind in ipairs(KINDS) do
  local name, new = kind[1], kind[2]
  describe(name, function()
    after_each(T.cleanup)

    it("test_task_done_underflow", function()
      assert.has_error(function() new():task_done() end, "task_done() called too many times")
    end)

    it("test_task_done", async(function()
      local q = new()
      for i = 0, 99 do q:put_nowait(i) end
      local accumulator = 0
      local function worker()
        while true do
          accumulator = accumulator + q:get()
          q:task_done()
          ioloop.sleep(math.random() * 0.01)
        end
      end
      -- two workers share the work
      ioloop.current():spawn(worker)
      ioloop.current():spawn(worker)
      assert.is_true(q:join(5))
      assert.equal(4950, accumulator)
    end))

    it("test_join_empty_queue", async(function()
      local q = new()
      assert.is_true(q:join())
      assert.is_true(q:join())
    end))

    it("test_join_timeout", async(function()
      local q = new()
      q:put(0)
      assert.same({nil, "timeout"}, {q:join(0.01)})
    end))

    it("test_producer_consumer", async(function()
      local q = new(3)
      local history = {}
      -- Translated: Tornado's consumer does not yield between items, and
      -- its get() waits for the next tick even when an item is ready; ours
      -- returns at once (DESIGN.md), so without a turn between items the
      -- consumer would empty the queue and join would return before the
      -- producer's next put. The consumer gives the loop a turn after each
      -- item, as "consumers would normally" (Tornado's comment).
      ioloop.current():spawn(function()
        for item in q:items() do
          history[#history + 1] = item
          q:task_done()
          ioloop.sleep(0)
        end
      end)
      ioloop.current():spawn(function()
        for item = 0, 9 do q:put(item) end
      end)
      assert.is_true(q:join(5))
      if new == queues.Queue then
        assert.same({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, history)
      else
        table.sort(history)
        assert.same({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, history)
      end
    end))
  end)
end

describe("PriorityQueueJoinTest", function()
  it("test_order", async(function()
    local q = queues.PriorityQueue(2, function(a, b) return a[1] < b[1] end)
    q:put_nowait({1, "a"})
    q:put_nowait({0, "b"})
    assert.is_true(q:full())
    future(q.put, q, {3, "c"})
    future(q.put, q, {2, "d"})
    assert.same({0, "b"}, q:get_nowait())
    assert.same({1, "a"}, q:get())
    assert.same({2, "d"}, q:get_nowait())
    assert.same({3, "c"}, q:get())
    assert.is_true(q:empty())
  end))
end)

describe("LifoQueueJoinTest", function()
  it("test_order", async(function()
    local q = queues.LifoQueue(2)
    q:put_nowait(1)
    q:put_nowait(0)
    assert.is_true(q:full())
    future(q.put, q, 3)
    future(q.put, q, 2)
    assert.equal(3, q:get_nowait())
    assert.equal(2, q:get())
    assert.equal(0, q:get_nowait())
    assert.equal(1, q:get())
    assert.is_true(q:empty())
  end))
end)
