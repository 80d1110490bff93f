--- Queues between tasks (as tornado.queues): Queue (first in, first out),
-- PriorityQueue (smallest first) and LifoQueue (last in, first out).
-- A bounded queue (maxsize > 0) makes its producers wait while it is full:
-- backpressure. Waiters wake in FIFO order on the loop's next iteration;
-- a put to an empty queue hands its item to the first getter at once, and
-- a get from a full queue takes the first waiting putter's item in.
local Waiters = require "tcpserver.waiters"

local M = {}

local Queue = {}
Queue.__index = Queue

-- The storage of each kind: push(self, item), pop(self) -> item.
local function fifo_push(self, item)
  local last = self.tail + 1
  self.buf[last], self.tail = item, last
end

local function fifo_pop(self)
  local head = self.head
  local item = self.buf[head]
  self.buf[head], self.head = nil, head + 1
  if head == self.tail then self.head, self.tail = 1, 0 end -- empty: start over
  return item
end

local function check_maxsize(maxsize, name)
  if maxsize == nil then return 0 end
  if math.type(maxsize) ~= "integer" or maxsize < 0 then
    error(name .. ": maxsize must be an integer >= 0 (0: unbounded)", 3)
  end
  return maxsize
end

local function new(mt, maxsize, name, push, pop)
  local q = setmetatable({
    max = check_maxsize(maxsize, name), buf = {}, head = 1, tail = 0,
    push = push, pop = pop, unfinished = 0,
    getters = Waiters.new(), putters = Waiters.new(), joiners = Waiters.new(),
  }, mt)
  -- a getter killed after it was handed an item: the item goes back, to
  -- the next getter or to the front (it may take the queue one past
  -- maxsize for a while)
  q.getters.on_lost = function(item)
    if q.getters:wake(item) then return end
    if pop == fifo_pop then
      q.head = q.head - 1
      q.buf[q.head] = item
    else
      push(q, item)
    end
  end
  return q
end

--- Queue([maxsize]): maxsize 0 (the default) is unbounded.
function M.Queue(maxsize)
  return new(Queue, maxsize, "Queue", fifo_push, fifo_pop)
end

function Queue:qsize() return self.tail - self.head + 1 end
function Queue:empty() return self.tail < self.head end
function Queue:full() return self.max > 0 and self:qsize() >= self.max end
function Queue:maxsize() return self.max end

-- Queues the item, or hands it to the first waiting getter.
local function add(self, item)
  self.unfinished = self.unfinished + 1
  local g = self.getters
  if g.first > g.last or not g:wake(item) then self.push(self, item) end
end

--- put_nowait(item) -> true, or nil, "full".
function Queue:put_nowait(item)
  if item == nil then error("put: the item must not be nil", 2) end
  local max = self.max
  if max > 0 and self.tail - self.head + 1 >= max then return nil, "full" end
  add(self, item)
  return true
end

--- put(item [, timeout]) -> true, or nil, "timeout" (the queue stayed full).
function Queue:put(item, timeout)
  if item == nil then error("put: the item must not be nil", 2) end
  local max = self.max
  if max == 0 or self.tail - self.head + 1 < max then
    add(self, item)
    return true
  end
  Waiters.check_timeout(timeout, "put")
  return self.putters:wait("put", timeout, item) -- a get takes the item in
end

-- Takes an item out. The first waiting putter's item goes in first (as
-- in Tornado: a LifoQueue then hands out that newest item).
local function take(self)
  local p = self.putters
  local putter = p.first <= p.last and p:wake(true)
  if putter then
    self.unfinished = self.unfinished + 1
    self.push(self, putter.value)
  end
  return self.pop(self)
end

--- get_nowait() -> item, or nil, "empty".
function Queue:get_nowait()
  if self.tail < self.head then return nil, "empty" end
  return take(self)
end

--- get([timeout]) -> item, or nil, "timeout".
function Queue:get(timeout)
  if self.tail >= self.head then return take(self) end
  Waiters.check_timeout(timeout, "get")
  return self.getters:wait("get", timeout)
end

--- Marks one item got earlier as processed (join waits for all of them).
function Queue:task_done()
  if self.unfinished <= 0 then error("task_done() called too many times", 2) end
  self.unfinished = self.unfinished - 1
  if self.unfinished == 0 then
    while self.joiners:wake(true) do end
  end
end

--- join([timeout]) -> true once every item put has been marked task_done,
-- or nil, "timeout".
function Queue:join(timeout)
  if self.unfinished == 0 then return true end
  Waiters.check_timeout(timeout, "join")
  return self.joiners:wait("join", timeout)
end

--- items(): an iterator that gets item after item, waiting for each,
-- forever: `for item in q:items() do ... end`.
function Queue:items()
  return function() return (self:get()) end
end

-- As Tornado's repr: <Queue maxsize=1 queue=2 getters[1] putters[1] tasks=2>,
-- each part only when it is not empty.
function Queue:__tostring()
  local out = {"<" .. self.name, "maxsize=" .. self.max}
  if not self:empty() then out[#out + 1] = "queue=" .. self:qsize() end
  if self.getters:any() then out[#out + 1] = ("getters[%d]"):format(self.getters:count()) end
  if self.putters:any() then out[#out + 1] = ("putters[%d]"):format(self.putters:count()) end
  if self.unfinished > 0 then out[#out + 1] = "tasks=" .. self.unfinished end
  return table.concat(out, " ") .. ">"
end
Queue.name = "Queue"

-- ---- PriorityQueue: a binary heap -----------------------------------------

local PriorityQueue = setmetatable({name = "PriorityQueue"}, {__index = Queue})
PriorityQueue.__index = PriorityQueue
PriorityQueue.__tostring = Queue.__tostring

local function heap_push(self, item)
  local heap, less = self.buf, self.less
  local i = self.tail + 1
  self.tail = i
  while i > 1 do
    local parent = i // 2
    if not less(item, heap[parent]) then break end
    heap[i] = heap[parent]
    i = parent
  end
  heap[i] = item
end

local function heap_pop(self)
  local heap, less, n = self.buf, self.less, self.tail
  local top, last = heap[1], heap[n]
  heap[n], self.tail = nil, n - 1
  n = n - 1
  if n > 0 then
    local i = 1
    while true do
      local child = 2 * i
      if child > n then break end
      if child < n and less(heap[child + 1], heap[child]) then child = child + 1 end
      if not less(heap[child], last) then break end
      heap[i] = heap[child]
      i = child
    end
    heap[i] = last
  end
  return top
end

local function default_less(a, b) return a < b end

--- PriorityQueue([maxsize [, less]]): the smallest item first, by `<` or
-- by less(a, b).
function M.PriorityQueue(maxsize, less)
  if less ~= nil and type(less) ~= "function" then
    error("PriorityQueue: less must be a function", 2)
  end
  local q = new(PriorityQueue, maxsize, "PriorityQueue", heap_push, heap_pop)
  q.less = less or default_less
  return q
end

-- ---- LifoQueue -------------------------------------------------------------

local LifoQueue = setmetatable({name = "LifoQueue"}, {__index = Queue})
LifoQueue.__index = LifoQueue
LifoQueue.__tostring = Queue.__tostring

local function lifo_pop(self)
  local tail = self.tail
  local item = self.buf[tail]
  self.buf[tail], self.tail = nil, tail - 1
  return item
end

--- LifoQueue([maxsize]): the newest item first.
function M.LifoQueue(maxsize)
  return new(LifoQueue, maxsize, "LifoQueue", fifo_push, lifo_pop)
end

return M
