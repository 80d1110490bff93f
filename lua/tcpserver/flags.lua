--- The flag parser of the scripts luahost runs (the examples use it):
-- `local opts = require("tcpserver.flags").parse(arg, defaults)`.
-- @module tcpserver.flags
local M = {}

--- Reads a script's flags, `--name value`
-- and `--name=value`, from `argv` (the script's `arg`) into a copy of
-- `defaults`, whose keys are the names allowed (`max_queue` is
-- `--max-queue`). A name whose default is a number takes a number (an
-- integer if the default is one); a default of false stands for a string
-- that may be left out. Bare words fill the names in `positional`, in
-- order (`luahost examples/echo.lua 8888`). `--help` prints the usage and
-- exits 0; anything else wrong prints it with the reason and exits 2.
function M.parse(argv, defaults, positional)
  local opts, names = {}, {}
  for name, v in pairs(defaults) do
    opts[name], names[#names + 1] = v, name
  end
  table.sort(names)
  local script = argv[0] or "script.lua"
  local function usage(out)
    local words = {}
    for _, name in ipairs(names) do
      local kind = type(defaults[name]) == "number" and "N" or "S"
      words[#words + 1] = ("[--%s %s]"):format(name:gsub("_", "-"), kind)
    end
    out:write("usage: luahost ", script, " ", table.concat(words, " "), "\n")
  end
  local function refuse(fmt, ...)
    usage(io.stderr)
    io.stderr:write(script, ": ", fmt:format(...), "\n")
    os.exit(2)
  end
  local function set(flag, value) -- flag: "max-queue" or a positional name
    local name = flag:gsub("-", "_")
    local default = defaults[name]
    if default == nil then refuse("unknown option --%s", flag) end
    if value == nil then refuse("--%s needs a value", flag) end
    if type(default) == "number" then
      local n = tonumber(value)
      if math.type(default) == "integer" then n = n and math.tointeger(n) end
      if not n then refuse("--%s needs a number, got '%s'", flag, value) end
      value = n
    end
    opts[name] = value
  end
  local i, bare = 1, 0
  while argv[i] ~= nil do
    local a = argv[i]
    local flag, value = a:match("^%-%-([^=]+)=(.*)$")
    if a == "-h" or a == "--help" then
      usage(io.stdout)
      os.exit(0)
    elseif flag then
      set(flag, value)
    elseif a:sub(1, 2) == "--" then
      set(a:sub(3), argv[i + 1])
      i = i + 1
    else
      bare = bare + 1
      local name = positional and positional[bare]
      if not name then refuse("unexpected argument '%s'", a) end
      set(name, a)
    end
    i = i + 1
  end
  return opts
end


return M
