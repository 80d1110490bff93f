--- Coordination between tasks (as tornado.locks).
local core = require "tcpserver.core"
local ioloop = require "tcpserver.ioloop"

local M = {}

local Event = {}
Event.__index = Event

--- An Event starts clear; wait() suspends the calling task until set().
function M.Event()
  return setmetatable({flag = false, waiters = {}}, Event)
end

function Event:is_set() return self.flag end

function Event:clear() self.flag = false end

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
  local waiters = self.waiters
  waiters[#waiters + 1] = co
  local timer
  if timeout then
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
  local ok, err = core.park()
  if timer then timer:cancel() end
  return ok, err
end

return M
