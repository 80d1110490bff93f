--- What the luahost executable runs: a script under the loop, with
-- SIGINT/SIGTERM stopping it gracefully.
local M = {}

M.usage = [[
usage: luahost [options] script.lua [args...]

Runs script.lua with the tcpserver modules available, then runs the event
loop until nothing is left to do or the process is told to stop.
SIGINT and SIGTERM stop accepting, let running handlers finish (at most
the servers' shutdown_timeout, 10 s by default) and exit 0.

options:
  -h, --help       show this help and exit
  -v, --version    print the version and exit
  -e CHUNK         run the Lua CHUNK before the script
]]

local function die(fmt, ...)
  io.stderr:write("luahost: ", fmt:format(...), "\n")
  os.exit(2)
end

--- main(argv): argv[0] is the program name, argv[1..] its arguments.
function M.main(argv)
  local i, chunks = 1, {}
  while argv[i] and argv[i]:sub(1, 1) == "-" do
    local a = argv[i]
    if a == "-h" or a == "--help" then io.stdout:write(M.usage); return 0
    elseif a == "-v" or a == "--version" then
      io.stdout:write("luahost (tcpserver) ", require("tcpserver.core").version, "\n")
      return 0
    elseif a == "-e" then
      chunks[#chunks + 1] = argv[i + 1] or die("-e needs an argument")
      i = i + 1
    elseif a == "--" then i = i + 1; break
    else die("unknown option %s (try --help)", a) end
    i = i + 1
  end
  local script = argv[i]
  if not script then io.stderr:write(M.usage); return 2 end

  local tcpserver = require "tcpserver"
  local ioloop = require "tcpserver.ioloop"
  local loop = ioloop.current()
  local stopping = false
  local function stop()
    if stopping then return end
    stopping = true
    local deadline = loop:call_later(30, function() loop:stop() end)
    tcpserver.shutdown_all(nil, function() deadline:cancel(); loop:stop() end)
  end
  loop:add_signal_handler("SIGTERM", stop)
  loop:add_signal_handler("SIGINT", stop)

  local args = {[-1] = argv[-1] or argv[0], [0] = script}
  for j = i + 1, #argv do args[#args + 1] = argv[j] end
  _G.arg = args

  for _, c in ipairs(chunks) do
    local f, err = load(c, "=(command line)")
    if not f then die("%s", err) end
    f()
  end
  local f, err = loadfile(script)
  if not f then
    io.stderr:write("luahost: ", err, "\n")
    return 1
  end
  local ok, e = xpcall(f, debug.traceback, table.unpack(args))
  if not ok then
    io.stderr:write("luahost: ", tostring(e), "\n")
    return 1
  end
  if not stopping then loop:start() end
  return 0
end

return M
