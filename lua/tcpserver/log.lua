--- Logging: levels, timestamps and a replaceable handler.
-- `handler(level, message)` receives every message at or above the level.
local M = {}

local LEVELS = {debug = 10, info = 20, warning = 30, error = 40}
M.levels = LEVELS

local threshold = LEVELS.info

-- One write per line: stderr is unbuffered, and the workers of
-- fork_processes share it, so a line written in pieces could interleave.
function M.default_handler(level, message)
  io.stderr:write(os.date("!%Y-%m-%d %H:%M:%S ") .. level:upper() .. " " .. message .. "\n")
end

M.handler = M.default_handler

--- Replaces the handler; nil restores the default one.
function M.set_handler(fn)
  assert(fn == nil or type(fn) == "function", "log.set_handler: function expected")
  M.handler = fn or M.default_handler
end

--- Sets the least severe level that is logged ("debug" ... "error").
function M.set_level(name)
  threshold = LEVELS[name] or error("log.set_level: unknown level '" .. tostring(name) .. "'", 2)
end

function M.get_level()
  for name, n in pairs(LEVELS) do
    if n == threshold then return name end
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
