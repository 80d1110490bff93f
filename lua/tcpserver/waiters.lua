--- The waiting tasks of a lock, condition or queue, in FIFO order (what
-- tcpserver.locks and tcpserver.queues share).
--
-- A waiter is parked with core.park; it is woken at most once, on the
-- loop's next iteration (never inside the waker's own call), either by
-- `wake` (with the values it is handed) or by its timeout. A waiter whose
-- timeout fired is skipped by later wakes and takes nothing.
local core = require "tcpserver.core"

local M = {}

--- Tasks that were killed (Task:kill): a wake passes them over.
M.killed = setmetatable({}, {__mode = "k"})

--- The wait each task is in (a record with its timeout's timer): Task:kill
-- cancels that timer, which would keep the loop running until it fired.
M.current = setmetatable({}, {__mode = "k"})

local Waiters = {}
Waiters.__index = Waiters

function M.new()
  return setmetatable({first = 1, last = 0}, Waiters)
end

-- Drops woken, timed-out or killed waiters from the front.
local function trim(self)
  local first, killed = self.first, M.killed
  while first <= self.last and (self[first].done or killed[self[first].co]) do
    self[first] = nil
    first = first + 1
  end
  self.first = first
end

--- Whether a waiter that can still be woken is queued.
function Waiters:any()
  trim(self)
  return self.first <= self.last
end

--- How many waiters are queued (some may have timed out: an upper bound).
function Waiters:count()
  return self.last - self.first + 1
end

--- The first waiter that can still be woken, left queued, or nil.
function Waiters:peek()
  trim(self)
  return self[self.first]
end

-- A task killed after it was woken but before it ran gives back what it
-- was handed (on_lost: a permit, an item), so that nothing is lost.
local function resume_later(self, w, a, b)
  core.timer(0, 0, function()
    if M.killed[w.co] then
      if self.on_lost then self.on_lost(a) end
      return
    end
    core.resume(w.co, a, b)
  end)
end

--- Wakes the first live waiter with (a, b) on the next iteration; returns
-- it (its `value` field is what the waker set before), or nil if none.
function Waiters:wake(a, b)
  trim(self)
  local first = self.first
  if first > self.last then return nil end
  local w = self[first]
  self[first], self.first = nil, first + 1
  w.done = true
  if w.timer then w.timer:cancel() end
  resume_later(self, w, a, b)
  return w
end

--- Parks the calling task (`what` names the call in errors) until woken
-- or, with a timeout, until it runs out: returns what `wake` passed, or
-- nil, "timeout". `value` rides along with the waiter (a putter's item).
function Waiters:wait(what, timeout, value)
  if not core.in_task() then
    error(what .. ": must be called from a task", 3)
  elseif not coroutine.isyieldable() then
    error(what .. ": cannot wait here: attempt to yield across a C-call boundary", 3)
  end
  timeout = M.limit(timeout)
  if timeout and timeout <= 0 then return nil, "timeout" end -- with_timeout's deadline passed
  local w = {co = coroutine.running(), done = false, value = value}
  local last = self.last + 1
  self[last], self.last = w, last
  if timeout then
    w.timer = core.timer(timeout, 0, function()
      if w.done then return end
      w.done = true
      self:forget()
      core.resume(w.co, nil, "timeout")
    end)
  end
  M.current[w.co] = w
  local a, b = core.park()
  M.current[w.co] = nil
  return a, b
end

--- Counts a waiter that left the queue out of turn (timed out); past 100
-- such, the live ones are packed (as Tornado does), so that a queue whose
-- front never moves does not grow with every timeout.
function Waiters:forget()
  local dead = (self.dead or 0) + 1
  if dead > 100 then
    local j = 0
    for i = self.first, self.last do
      local w = self[i]
      self[i] = nil
      if not w.done then j = j + 1; self[j] = w end
    end
    self.first, self.last, dead = 1, j, 0
  end
  self.dead = dead
end

--- A wait's timeout (nil: none) under the running task's deadline
-- (ioloop.with_timeout), if it has one and that is sooner.
function M.limit(timeout)
  local deadline = core.deadline()
  if not deadline then return timeout end
  local left = deadline - core.time()
  if left > 1e9 then return timeout end -- beyond what a timer takes: none
  if timeout == nil or left < timeout then return left end
  return timeout
end

--- Checks an optional timeout argument (seconds, >= 0).
function M.check_timeout(timeout, what)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0 or timeout ~= timeout) then
    error(what .. ": timeout must be a number of seconds (0 or more)", 3)
  end
end

return M
