--- Logging: levels, line formats and a replaceable handler.
-- `handler(level, message)` receives every message at or above the level.
-- The default handler writes one line per message to stderr, as text:
--
--     2026-11-30T04:55:01Z INFO [12345] Starting 2 processes
--     2026-11-30T04:55:01Z ERROR [12346/1] Uncaught error in handle_stream ...
--
-- (UTC time, the level, `[pid]`, or `[pid/task id]` in a forked worker), or
-- as JSON lines after `set_format("json")`:
--
--     {"time":"2026-11-30T04:55:01Z","level":"info","pid":12346,"task":1,"message":"..."}
--
-- luahost sets both with `--log-level` and `--log-format`.
-- @module tcpserver.log
local M = {}

--- Level names and their order.
local LEVELS = {debug = 10, info = 20, warning = 30, error = 40}
M.levels = LEVELS

local threshold = LEVELS.info
local format = "text"

-- The core is loaded lazily: log is required by everything, and the pid
-- and task id change across a fork, so they are asked for each line.
local core
local function ids()
  core = core or require "tcpserver.core"
  return core.getpid(), core.task_id()
end

local function timestamp()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

local ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t"}

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or ("\\u%04x"):format(c:byte())
  end) .. '"'
end

--- The line the default handler writes for a message (without newline).
-- @tparam string level
-- @tparam string message
-- @treturn string
function M.format_line(level, message)
  local pid, task = ids()
  if format == "json" then
    return ('{"time":"%s","level":"%s","pid":%d,%s"message":%s}'):format(
      timestamp(), level, pid, task and ('"task":%d,'):format(task) or "", json_string(message))
  end
  local who = task and ("[%d/%d]"):format(pid, task) or ("[%d]"):format(pid)
  return ("%s %s %s %s"):format(timestamp(), level:upper(), who, message)
end

--- Writes `format_line(level, message)` to stderr, in one write: stderr is
-- unbuffered, and the workers of fork_processes share it, so a line
-- written in pieces could interleave.
function M.default_handler(level, message)
  io.stderr:write(M.format_line(level, message) .. "\n")
end

M.handler = M.default_handler

--- Replaces the handler; nil restores the default one.
-- @tparam ?function fn `fn(level, message)`
function M.set_handler(fn)
  assert(fn == nil or type(fn) == "function", "log.set_handler: function expected")
  M.handler = fn or M.default_handler
end

--- Sets the least severe level that is logged ("debug" ... "error").
function M.set_level(name)
  threshold = LEVELS[name] or error("log.set_level: unknown level '" .. tostring(name)
                                    .. "' (debug, info, warning, error)", 2)
end

function M.get_level()
  for name, n in pairs(LEVELS) do
    if n == threshold then return name end
  end
end

--- Sets the default handler's line format: "text" (the default) or "json".
function M.set_format(name)
  if name ~= "text" and name ~= "json" then
    error("log.set_format: unknown format '" .. tostring(name) .. "' (text, json)", 2)
  end
  format = name
end

function M.get_format()
  return format
end

-- lualogging's level names for ours.
local LUALOGGING_LEVELS = {debug = "DEBUG", info = "INFO", warning = "WARN", error = "ERROR"}

--- A handler that passes every message to a lualogging logger:
-- `log.set_handler(log.lualogging(require("logging.console")()))`.
-- Levels map to DEBUG, INFO, WARN and ERROR; the message is passed as
-- data, never as a format string. tcpserver's own level still filters
-- first (set it to "debug" to leave the choice to the logger).
-- @param logger a lualogging logger (anything with `:log(level, fmt, ...)`)
-- @treturn function a handler for @{set_handler}
function M.lualogging(logger)
  assert(type(logger) == "table" and logger.log, "log.lualogging: a lualogging logger expected")
  return function(level, message)
    logger:log(LUALOGGING_LEVELS[level], "%s", message)
  end
end

--- log(level, fmt, ...): fmt is formatted with string.format when args follow.
function M.log(level, fmt, ...)
  local n = LEVELS[level] or error("log: unknown level '" .. tostring(level) .. "'", 2)
  if n < threshold then return end
  local message = select("#", ...) > 0 and fmt:format(...) or tostring(fmt)
  M.handler(level, message)
end

for name in pairs(LEVELS) do
  M[name] = function(fmt, ...) return M.log(name, fmt, ...) end
end

return M
