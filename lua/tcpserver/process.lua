--- Processes: prefork workers (fork_processes), child processes with
-- streams on their pipes (Subprocess) and the CPU count.
local core = require "tcpserver.core"
local log = require "tcpserver.log"
require "tcpserver.iostream"

local M = {}

local STDIO = {pipe = true, null = true}

local Subprocess = {}
Subprocess.__index = Subprocess

--- Subprocess(argv [, {stdin=, stdout=, stderr=, env=}]): runs argv[1]
-- (searched in PATH). Each of stdin/stdout/stderr may be "pipe" (the field
-- becomes a stream), "null", or nil (inherited).
function M.Subprocess(argv, opts)
  if type(argv) ~= "table" or #argv == 0 then
    error("Subprocess: argv must be a non-empty list of strings", 2)
  end
  opts = opts or {}
  for _, k in ipairs {"stdin", "stdout", "stderr"} do
    if opts[k] ~= nil and not STDIO[opts[k]] then
      error("Subprocess: " .. k .. " must be \"pipe\", \"null\" or nil", 2)
    end
  end
  local env
  if opts.env then
    env = {}
    for k, v in pairs(opts.env) do env[#env + 1] = k .. "=" .. v end
  end
  local proc, stdin, stdout, stderr =
    core.spawn_process(argv, opts.stdin, opts.stdout, opts.stderr, env)
  return setmetatable({proc = proc, pid = proc:pid(), stdin = stdin,
                       stdout = stdout, stderr = stderr}, Subprocess)
end

--- Waits for the child to exit; returns its exit status and the signal
-- that ended it (0 if none).
function Subprocess:wait_for_exit()
  return self.proc:wait_for_exit()
end

function Subprocess:kill(signal)
  return self.proc:kill(signal or 15)
end

M.cpu_count = core.cpu_count

--- The id of this process (an integer).
M.getpid = core.getpid

--- The task id given by fork_processes in this worker, nil elsewhere.
function M.task_id()
  return core.task_id()
end

local function supervisor_log(level, message)
  log.log(level, "%s", message)
end

--- fork_processes(n [, max_restarts]): forks n workers (nil, 0 or a
-- negative n: one per CPU) and returns the task id (0..n-1) in each. The
-- parent never returns: it supervises. A worker that exits non-zero or dies
-- from a signal is restarted with the same id, after a back-off (0.1 s,
-- doubling with each crash of that task in a row, at most 10 s; a worker
-- that served 10 s starts it over), at most max_restarts times in all (100
-- by default; after that the parent stops the others and raises). One that
-- exits 0 is not restarted. A worker is ready once its loop runs (ioloop
-- start or run_sync, so listen before that): if one fails before that and
-- no worker of its task ever was, the start failed (a port in use, a bug)
-- and restarting would fail again: the parent stops the others and raises
-- one error, with the worker's own message when it gave it to
-- start_failed. Workers whose loop runs stop gracefully on SIGTERM and
-- SIGINT (see IOLoop:stop_gracefully), which the parent forwards to them;
-- SIGHUP replaces them one by one: the new worker first, and once it is
-- ready the old one gets SIGTERM and drains; a new worker that exits before
-- it is ready stops the reload. The parent exits 0 when every worker is
-- gone. Bind sockets before, start the loop after.
function M.fork_processes(n, max_restarts)
  if n ~= nil and math.type(n) ~= "integer" then
    error("fork_processes: number of processes must be an integer or nil", 2)
  end
  if max_restarts ~= nil and (math.type(max_restarts) ~= "integer" or max_restarts < 0) then
    error("fork_processes: max_restarts must be a non-negative integer or nil", 2)
  end
  if core.task_id() then
    error(("fork_processes: already called (this is task %d)"):format(core.task_id()), 2)
  end
  if core.running() or core.in_task() then
    error("fork_processes: cannot fork from a task or while the loop runs", 2)
  end
  if n == nil or n <= 0 then n = core.cpu_count() end
  log.info("Starting %d processes", n)
  return core.fork_processes(n, max_restarts or 100, supervisor_log)
end

--- start_failed(message): in a worker of fork_processes whose loop has not
-- run yet, hands the first line of `message` to the supervisor, which
-- stops the start and raises it as fork_processes' error (once, however
-- many workers fail), and returns true: the caller exits without printing
-- it. Returns false elsewhere. luahost calls it when a worker's script
-- raises.
M.start_failed = core.start_failed

--- Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit.
M.raise_fd_limit = core.raise_fd_limit

return M
