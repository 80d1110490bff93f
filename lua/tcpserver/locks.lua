--- Coordination between tasks (as tornado.locks): Event, Condition,
-- Semaphore, BoundedSemaphore and Lock. Waiters wake in FIFO order, on the
-- loop's next iteration; what is released passes to the first waiter at
-- once. A wait that times out returns nil, "timeout" and takes nothing.
local core = require "tcpserver.core"
local ioloop = require "tcpserver.ioloop"
local Waiters = require "tcpserver.waiters"

local M = {}

local Event = {}
Event.__index = Event

--- An Event starts clear; wait() suspends the calling task until set().
function M.Event()
  return setmetatable({flag = false, waiters = {}}, Event)
end

function Event:is_set() return self.flag end

function Event:clear() self.flag = false end

function Event:__tostring()
  return ("<Event %s>"):format(self.flag and "set" or "clear")
end

--- Wakes every waiting task (on the next loop iteration) and lets later
-- waits return at once.
function Event:set()
  if self.flag then return end
  self.flag = true
  local waiters = self.waiters
  self.waiters = {}
  local loop = ioloop.current()
  for i, co in ipairs(waiters) do
    loop:add_callback(core.resume, co, true)
    waiters[i] = false -- a pending timeout must not wake it twice
  end
end

--- Returns true once the event is set, or nil, "timeout" after `timeout`
-- seconds (if given).
function Event:wait(timeout)
  if self.flag then return true end
  local co = coroutine.running()
  if not core.in_task() then
    error("Event:wait: must be called from a task", 2)
  elseif not coroutine.isyieldable() then
    error("Event:wait: cannot wait here: attempt to yield across a C-call boundary", 2)
  end
  timeout = Waiters.limit(timeout) -- with_timeout's deadline
  if timeout and timeout <= 0 then return nil, "timeout" end
  local waiters = self.waiters
  waiters[#waiters + 1] = co
  local timer
  if timeout then
    Waiters.current[co] = {timer = nil}
    timer = ioloop.current():call_later(timeout, function()
      for i, w in ipairs(waiters) do
        if w == co then
          table.remove(waiters, i)
          core.resume(co, nil, "timeout")
          return
        end
      end
    end)
  end
  if timer then Waiters.current[co].timer = timer end
  local ok, err = core.park()
  Waiters.current[co] = nil
  if timer then timer:cancel() end
  return ok, err
end

-- ---- Condition ----------------------------------------------------------

local Condition = {}
Condition.__index = Condition

--- A Condition: tasks wait() until another task notifies them.
function M.Condition()
  local c = setmetatable({waiters = Waiters.new()}, Condition)
  c.waiters.on_lost = function() c:notify(1) end
  return c
end

--- Waits until notified: true, or nil, "timeout" after `timeout` seconds.
function Condition:wait(timeout)
  Waiters.check_timeout(timeout, "Condition:wait")
  return self.waiters:wait("Condition:wait", timeout)
end

--- Wakes `n` waiters (1), the longest waiting first.
function Condition:notify(n)
  n = n or 1
  if math.type(n) ~= "integer" or n < 0 then
    error("Condition:notify: n must be an integer >= 0", 2)
  end
  for _ = 1, n do
    if not self.waiters:wake(true) then break end
  end
end

--- Wakes every waiter.
function Condition:notify_all()
  while self.waiters:wake(true) do end
end

function Condition:__tostring()
  if not self.waiters:any() then return "<Condition>" end
  return ("<Condition waiters[%d]>"):format(self.waiters:count())
end

-- ---- Semaphore, BoundedSemaphore, Lock ------------------------------------

-- A guard releases its permit once, when closed (`local g <close> = ...`).
local Guard = {}
Guard.__index = Guard

function Guard:release()
  if self.owner then
    local owner = self.owner
    self.owner = nil
    owner:release()
  end
end
Guard.__close = Guard.release

local Semaphore = {}
Semaphore.__index = Semaphore

local function new_semaphore(mt, value, name)
  if value == nil then value = 1 end
  if math.type(value) ~= "integer" then
    error(name .. ": value must be an integer", 3)
  elseif value < 0 then
    error(name .. ": semaphore initial value must be >= 0", 3)
  end
  local sem = setmetatable({value = value, initial = value, waiters = Waiters.new()}, mt)
  sem.waiters.on_lost = function() Semaphore.release(sem) end
  return sem
end

--- A Semaphore of `value` (1) permits.
function M.Semaphore(value)
  return new_semaphore(Semaphore, value, "Semaphore")
end

--- Takes a permit: a guard (a to-be-closed value whose close releases it
-- once), or nil, "timeout". Returns at once when a permit is free.
function Semaphore:acquire(timeout)
  Waiters.check_timeout(timeout, "acquire")
  if self.value > 0 then
    self.value = self.value - 1
  else
    local ok, err = self.waiters:wait("acquire", timeout)
    if not ok then return nil, err end
  end
  return setmetatable({owner = self}, Guard)
end

--- Gives a permit back: to the first waiter if there is one.
function Semaphore:release()
  local w = self.waiters
  if w.first > w.last or not w:wake(true) then self.value = self.value + 1 end
end

--- Whether acquire would wait.
function Semaphore:locked()
  return self.value == 0
end

-- As Tornado's repr: <Semaphore [unlocked,value:1]>, <Semaphore [locked,waiters:2]>.
function Semaphore:__tostring()
  local state = self.value == 0 and "locked" or "unlocked,value:" .. self.value
  if self.waiters:any() then state = state .. ",waiters:" .. self.waiters:count() end
  return ("<%s [%s]>"):format(getmetatable(self).name, state)
end
Semaphore.name = "Semaphore"

local BoundedSemaphore = setmetatable({name = "BoundedSemaphore"}, {__index = Semaphore})
BoundedSemaphore.__index = BoundedSemaphore
BoundedSemaphore.__tostring = Semaphore.__tostring

--- A Semaphore whose release past its initial value raises.
function M.BoundedSemaphore(value)
  return new_semaphore(BoundedSemaphore, value, "BoundedSemaphore")
end

function BoundedSemaphore:release()
  if self.value >= self.initial then error("Semaphore released too many times", 2) end
  Semaphore.release(self)
end

local Lock = {}
Lock.__index = Lock

--- A Lock: one holder at a time.
function M.Lock()
  local lock = setmetatable({held = false, waiters = Waiters.new()}, Lock)
  lock.waiters.on_lost = function() lock:release() end
  return lock
end

--- Takes the lock: a guard (close it to release, once), or nil, "timeout".
function Lock:acquire(timeout)
  if not self.held then -- the common case first
    self.held = true
    return setmetatable({owner = self}, Guard)
  end
  Waiters.check_timeout(timeout, "Lock:acquire")
  local ok, err = self.waiters:wait("Lock:acquire", timeout)
  if not ok then return nil, err end
  return setmetatable({owner = self}, Guard)
end

--- Releases the lock: to the first waiter, if any.
function Lock:release()
  if not self.held then error("release unlocked lock", 2) end
  local w = self.waiters
  if w.first > w.last or not w:wake(true) then self.held = false end
end

function Lock:locked()
  return self.held
end

function Lock:__tostring()
  local state = self.held and "locked" or "unlocked"
  if self.waiters:any() then state = state .. ",waiters:" .. self.waiters:count() end
  return ("<Lock [%s]>"):format(state)
end

return M
