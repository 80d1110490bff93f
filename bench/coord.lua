-- bench/coord.lua -- CPU per operation of the coordination primitives
-- (tcpserver.locks, tcpserver.queues) beside their floor: a plain Lua
-- table insert-and-remove of the same item (t[#t + 1] = x; t[#t] = nil).
--
--   build/luahost bench/coord.lua
--
-- Timed with os.clock (this process's CPU) over N operations, REPEATS
-- times, the operations interleaved; min / median / max ns per operation.
--   lock      an uncontended Lock: acquire, then close its guard
--   lock_rel  the same, released with lock:release() (no guard close)
--   queue     a Queue put_nowait + get_nowait that find it ready
--   queue_w   Queue put + get (the waiting forms) that find it ready
--   handoff   one item from a task to another waiting in get(): put, the
--             loop turn, the getter's resume (a wake-up's whole cost)
--   methods   two empty method calls (o:put(x); o:get()): the least a
--             put-and-get can cost with a method-call API
-- Output: one line per operation,
--   coord op=NAME ns_min=... ns_med=... ns_max=... ratio_med=... vs_methods=...
-- (medians' ratios to the floor and to `methods`).
-- Environment: COORD_N (200000), COORD_REPEATS (5).
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local queues = require "tcpserver.queues"

local N = math.tointeger(tonumber(os.getenv("COORD_N") or "")) or 200000
local REPEATS = math.tointeger(tonumber(os.getenv("COORD_REPEATS") or "")) or 5
local clock = os.clock

local ops = {}

ops.floor = function(n)
  local t, item = {}, "x" -- luacheck: ignore 241
  local t0 = clock()
  for _ = 1, n do
    t[#t + 1] = item
    t[#t] = nil
  end
  return clock() - t0
end

-- Two empty method calls on a table with a metatable: the least a
-- put-and-get (or acquire-and-release) can cost with this API's shape.
local Obj = {}
Obj.__index = Obj
function Obj:put(x) self.x = x end
function Obj:get() return self.x end

ops.methods = function(n)
  local o, item = setmetatable({}, Obj), "x"
  local t0 = clock()
  for _ = 1, n do
    o:put(item)
    o:get()
  end
  return clock() - t0
end

ops.lock = function(n)
  local lock = locks.Lock()
  local t0 = clock()
  for _ = 1, n do
    local _guard <close> = lock:acquire()
  end
  return clock() - t0
end

ops.lock_rel = function(n)
  local lock = locks.Lock()
  local t0 = clock()
  for _ = 1, n do
    lock:acquire()
    lock:release()
  end
  return clock() - t0
end

ops.queue = function(n)
  local q, item = queues.Queue(), "x"
  local t0 = clock()
  for _ = 1, n do
    q:put_nowait(item)
    q:get_nowait()
  end
  return clock() - t0
end

ops.queue_w = function(n)
  local q, item = queues.Queue(), "x"
  local t0 = clock()
  for _ = 1, n do
    q:put(item)
    q:get()
  end
  return clock() - t0
end

-- Wake-ups are fewer: each one turns the loop.
ops.handoff = function(n)
  n = n // 20
  local q, loop = queues.Queue(), ioloop.current()
  local got = 0
  local getter = loop:spawn(function()
    while got < n do
      q:get()
      got = got + 1
    end
  end)
  local t0 = clock()
  for i = 1, n do
    q:put(i)
    ioloop.sleep(0) -- the getter runs on this turn
  end
  local t = clock() - t0
  getter:join()
  return t * 20 -- per operation of the others' count
end

local order = {"floor", "methods", "lock", "lock_rel", "queue", "queue_w", "handoff"}

ioloop.current():run_sync(function()
  local times = {}
  for _, name in ipairs(order) do times[name] = {} end
  for _ = 1, REPEATS do
    for _, name in ipairs(order) do
      local t = times[name]
      t[#t + 1] = ops[name](N) / N * 1e9
    end
  end
  local function stats(t)
    table.sort(t)
    return t[1], t[(#t + 1) // 2], t[#t]
  end
  local _, floor_med = stats(times.floor)
  local _, methods_med = stats(times.methods)
  for _, name in ipairs(order) do
    local lo, med, hi = stats(times[name])
    print(("coord op=%s ns_min=%.1f ns_med=%.1f ns_max=%.1f ratio_med=%.2f vs_methods=%.2f"):format(
      name, lo, med, hi, med / floor_med, med / methods_med))
  end
end)
