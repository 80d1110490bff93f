--- The per-process event loop: start/stop, timers, callbacks and tasks.
-- Tasks are coroutines the loop resumes; only they may call what waits
-- (stream reads, sleep, connect).
local core = require "tcpserver.core"
local log = require "tcpserver.log"

local pack, unpack = table.pack, table.unpack

core.set_log_handler(function(level, message) log.log(level, "%s", message) end)

local M = {}

local IOLoop = {}
IOLoop.__index = IOLoop

local current

--- The process's loop (there is one per process).
function M.current()
  if not current then current = setmetatable({}, IOLoop) end
  return current
end

local function check_function(fn, where)
  if type(fn) ~= "function" then
    error(where .. ": function expected, got " .. type(fn), 3)
  end
end

local function check_seconds(s, where)
  if type(s) ~= "number" or s < 0 or s ~= s then
    error(where .. ": delay must be a non-negative number of seconds", 3)
  end
end

-- Signals the script handles itself (add_signal_handler): luahost does,
-- for SIGINT and SIGTERM.
local handled = {}
local stopping = false

-- Runs the loop. Meanwhile, SIGINT and SIGTERM stop it gracefully unless
-- the script handles them: without this, plain lua5.4's SIGINT handler
-- would only raise "interrupted!" in whatever Lua code runs next, and
-- SIGTERM would kill a forked worker in the middle of its requests.
local function run()
  if core.running() or core.in_task() then
    error("ioloop: the loop is already running", 3)
  end
  local defaults = {}
  for _, name in ipairs {"SIGINT", "SIGTERM"} do
    if not handled[name] then
      defaults[#defaults + 1] = core.signal(name, function()
        -- a handler added while the loop runs wins too
        if not handled[name] then M.current():stop_gracefully() end
      end)
    end
  end
  local ok, err = pcall(core.start)
  for _, handle in ipairs(defaults) do handle:cancel() end
  stopping = false
  if not ok then error(err, 0) end
end

--- Runs the loop until stop() or until nothing is left to do.
function IOLoop:start() run() end

function IOLoop:stop()
  if core.running() then core.stop() end
end

function IOLoop:running() return core.running() end

--- Monotonic time in seconds.
function IOLoop:time() return core.time() end

local function bind(fn, ...)
  local n = select("#", ...)
  if n == 0 then return fn end
  local args = pack(...)
  return function() return fn(unpack(args, 1, args.n)) end
end

--- Calls fn(...) after `delay` seconds; returns a handle with :cancel().
function IOLoop:call_later(delay, fn, ...)
  check_seconds(delay, "call_later")
  check_function(fn, "call_later")
  return core.timer(delay, 0, bind(fn, ...))
end

function IOLoop:call_at(when, fn, ...)
  return self:call_later(math.max(0, when - core.time()), fn, ...)
end

--- Calls fn(...) on the next iteration of the loop.
function IOLoop:add_callback(fn, ...)
  check_function(fn, "add_callback")
  return core.timer(0, 0, bind(fn, ...))
end

--- Runs fn(...) in a new task on the next iteration.
function IOLoop:spawn_callback(fn, ...)
  check_function(fn, "spawn_callback")
  local args = pack(...)
  return core.timer(0, 0, function() core.spawn(fn, unpack(args, 1, args.n)) end)
end

-- ---- Task handles ----------------------------------------------------------

local Waiters = require "tcpserver.waiters"

local Task = {}
Task.__index = Task

-- The task ended (state "done", "failed" or "killed"): its joiners and
-- wait_any callers wake.
local function finish(task, state)
  task.state = state
  while task.joiners:wake(true) do end
  for _, w in ipairs(task.watchers) do w:wake(task) end
  task.watchers = {}
end

--- Runs fn(...) in a new task now, until it first waits; returns its
-- Task: `join([timeout])`, `kill()`, `done()`. An error in fn reaches its
-- joiners as nil, message, and is logged (with its traceback) if nobody
-- was joining when it ended.
function IOLoop:spawn(fn, ...)
  check_function(fn, "spawn")
  local task = setmetatable({state = "running", joiners = Waiters.new(), watchers = {}}, Task)
  core.spawn(function(...)
    task.co = coroutine.running()
    local traceback
    local r = pack(xpcall(fn, function(err)
      traceback = debug.traceback(tostring(err), 2)
      return err
    end, ...))
    if task.state ~= "running" then return end
    task.results = r
    if not r[1] and not task.joiners:any() then log.error("%s", traceback) end
    finish(task, r[1] and "done" or "failed")
  end, ...)
  return task
end

--- Whether the task has ended (returned, raised or was killed).
function Task:done()
  return self.state ~= "running"
end

-- What join returns once the task has ended.
local function outcome(task)
  if task.state == "killed" then return nil, "killed" end
  local r = task.results
  if not r[1] then return nil, tostring(r[2]) end
  return true, unpack(r, 2, r.n)
end

--- Waits for the task: true and its results, or nil and the error's
-- message, "killed" or "timeout".
function Task:join(timeout)
  if self.state == "running" then
    Waiters.check_timeout(timeout, "join")
    local ok, err = self.joiners:wait("join", timeout)
    if not ok then return nil, err end
  end
  return outcome(self)
end

--- Stops the task: it is never resumed again, its to-be-closed variables
-- are closed, a stream read or write it waited in is cancelled (the
-- stream goes on), and its joiners get nil, "killed". Returns true if it
-- was running. A task cannot kill itself.
function Task:kill()
  if self.state ~= "running" then return false end
  if self.co == coroutine.running() then
    error("kill: a task cannot kill itself (return from it instead)", 2)
  end
  Waiters.killed[self.co] = true
  local w = Waiters.current[self.co] -- a lock's, queue's or event's timeout
  if w and w.timer then w.timer:cancel() end
  self.state = "killing" -- its __close handlers run now
  core.kill(self.co)
  finish(self, "killed")
  return true
end

function Task:__tostring()
  return ("<Task %s>"):format(self.state)
end

--- The first of `tasks` to end (at once if one has), or nil, "timeout".
function M.wait_any(tasks, timeout)
  if type(tasks) ~= "table" or #tasks == 0 then
    error("wait_any: a non-empty list of tasks expected", 2)
  end
  for _, t in ipairs(tasks) do
    if getmetatable(t) ~= Task then error("wait_any: a list of tasks expected", 2) end
    if t.state ~= "running" and t.state ~= "killing" then return t end
  end
  Waiters.check_timeout(timeout, "wait_any")
  local w = Waiters.new()
  for _, t in ipairs(tasks) do t.watchers[#t.watchers + 1] = w end
  local first, err = w:wait("wait_any", timeout)
  for _, t in ipairs(tasks) do -- the others forget this wait
    for i = #t.watchers, 1, -1 do
      if t.watchers[i] == w then table.remove(t.watchers, i) end
    end
  end
  return first, err
end

M.Task = Task

-- Restores the deadline a with_timeout replaced, also when its function
-- raises or its task is killed.
local Restore = {__close = function(r) core.set_deadline(r.outer) end}

--- Runs fn(...) in the calling task under one deadline, `seconds` from
-- now, that every wait inside it keeps (reads, writes, connects, locks,
-- queues, sleeps; a nested with_timeout keeps the earlier deadline): a wait
-- that reaches it returns nil, "timeout". Returns fn's results if fn
-- returns before the deadline, else nil, "timeout". An error in fn passes
-- through.
function M.with_timeout(seconds, fn, ...)
  if type(seconds) ~= "number" or seconds < 0 or seconds ~= seconds then
    error("with_timeout: seconds must be a number >= 0", 2)
  end
  check_function(fn, "with_timeout")
  if not core.in_task() then error("with_timeout: must be called from a task", 2) end
  local outer = core.deadline()
  local deadline = core.time() + seconds
  if outer and outer < deadline then deadline = outer end
  core.set_deadline(deadline)
  local _restore <close> = setmetatable({outer = outer}, Restore)
  local r = pack(fn(...))
  if core.time() >= deadline then return nil, "timeout" end
  return unpack(r, 1, r.n)
end

--- Starts the loop, runs fn in a task and stops when it returns; returns
-- fn's results or raises its error. `timeout` (seconds) raises on expiry.
function IOLoop:run_sync(fn, timeout)
  check_function(fn, "run_sync")
  if timeout ~= nil then check_seconds(timeout, "run_sync") end
  if core.running() or core.in_task() then
    error("run_sync: the loop is already running", 2)
  end
  local result, abandoned
  core.spawn(function()
    local r = pack(xpcall(fn, debug.traceback))
    -- After a timeout this run is over: its end must not stop a later one.
    if abandoned then return end
    result = r
    if core.running() then core.stop() end
  end)
  if not result then
    local timer = timeout and core.timer(timeout, 0, core.stop)
    run()
    if timer then timer:cancel() end
  end
  if not result then
    abandoned = true
    if not timeout then
      error("run_sync: the loop stopped before the function finished", 2)
    end
    error(("run_sync: timed out after %g seconds"):format(timeout), 2)
  end
  if not result[1] then error(result[2], 0) end
  return unpack(result, 2, result.n)
end

--- The read budget: what all streams' read buffers together may hold in
-- this process (a quarter of its memory by default). Past it, the largest
-- buffers are refused: their reads fail with "too large" and they close.
-- With `bytes`, sets it. Returns the budget, the bytes held now and the
-- number of streams holding them.
function IOLoop:read_budget(bytes)
  if bytes ~= nil and (math.type(bytes) ~= "integer" or bytes <= 0) then
    error("read_budget: bytes must be a positive integer", 2)
  end
  return core.read_budget(bytes)
end

--- Calls fn(signal_number) when the process gets `name` ("SIGTERM", ...),
-- for as long as the process lives. For SIGINT and SIGTERM it replaces
-- the loop's default: stop_gracefully() while the loop runs.
function IOLoop:add_signal_handler(name, fn)
  check_function(fn, "add_signal_handler")
  core.signal(name, fn)
  handled[name] = true
end

local shutdown_hooks = {}

--- Registers fn(done) to run when the loop stops gracefully: it begins
-- its part of the stop, calls done() once that is over, and returns the
-- most seconds that may take (tcpserver registers its servers' drain).
function M.on_shutdown(fn)
  check_function(fn, "on_shutdown")
  shutdown_hooks[#shutdown_hooks + 1] = fn
end

--- What SIGINT and SIGTERM do by default while the loop runs: every
-- shutdown hook (M.on_shutdown) runs, every server in this process thus
-- stops accepting and drains (TCPServer:shutdown, within its
-- shutdown_timeout), then the loop stops; it stops anyway one second
-- after the longest a hook said it may take, should a handler outlive the
-- close of its streams. Calls after the first do nothing.
function IOLoop:stop_gracefully()
  if stopping or not core.running() then return end
  stopping = true
  local left, longest, deadline = #shutdown_hooks + 1, 0, nil
  local function one()
    left = left - 1
    if left > 0 then return end
    if deadline then deadline:cancel() end
    self:stop()
  end
  for _, hook in ipairs(shutdown_hooks) do
    local done = false
    longest = math.max(longest, hook(function()
      if done then return end
      done = true
      one()
    end) or 0)
  end
  one()
  if left > 0 then
    deadline = core.timer(longest + 1, 0, function()
      log.warning("Handlers still running %g s after the shutdown began: stopping the loop",
                  longest + 1)
      self:stop()
    end)
  end
end

--- Suspends the calling task for `seconds`.
function M.sleep(seconds)
  check_seconds(seconds, "sleep")
  return core.sleep(seconds)
end
IOLoop.sleep = function(_, seconds) return M.sleep(seconds) end

--- Calls fn every `ms` milliseconds once started.
local Periodic = {}
Periodic.__index = Periodic

function M.PeriodicCallback(fn, ms)
  check_function(fn, "PeriodicCallback")
  if type(ms) ~= "number" or ms <= 0 then
    error("PeriodicCallback: interval must be a positive number of milliseconds", 2)
  end
  return setmetatable({callback = fn, callback_time = ms}, Periodic)
end

function Periodic:start()
  if self.timer then return end
  local s = self.callback_time / 1000
  self.timer = core.timer(s, s, self.callback)
end

function Periodic:stop()
  if self.timer then self.timer:cancel() end
  self.timer = nil
end

function Periodic:is_running() return self.timer ~= nil end

M.IOLoop = IOLoop
return M
