--- Processes: child processes with streams on their pipes (Subprocess)
-- and the CPU count.
local core = require "tcpserver.core"
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

--- Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit.
M.raise_fd_limit = core.raise_fd_limit

return M
