--- What the luahost executable runs: a script under the loop, with
-- SIGINT/SIGTERM stopping it gracefully; with --workers, N copies of it
-- under one supervisor.
local M = {}

M.usage = [[
usage: luahost [options] script.lua [args...]

Runs script.lua with the tcpserver modules available, then runs the event
loop until nothing is left to do (no server, open stream, timer or callback:
a stream nobody closes keeps it running) or the process is told to stop.
SIGINT and SIGTERM stop accepting, let running handlers finish (at most
the servers' shutdown_timeout, 10 s by default) and exit 0.

options:
  -h, --help           show this help and exit
  -v, --version        print the version and exit
  -e CHUNK             run the Lua CHUNK before the script (repeatable)
      --gc MODE        Lua's garbage collector: "generational" (the
                       default: a server's garbage is mostly short-lived
                       strings, which minor collections reclaim cheaply)
                       or "incremental" (Lua's own default)
  -w, --workers N      run N copies of the script (0: one per CPU) under a
                       supervisor that restarts a copy that crashes (exits
                       non-zero or dies from a signal) but not one that
                       exits 0, and exits 0 once all are gone. Each copy
                       loads the script itself, and listen/bind use
                       reuse_port there: every worker binds its own socket.
                       process.task_id() tells the copies apart (0..N-1).
      --max-restarts N with --workers: give up (stop the workers, exit 1)
                       after N restarts in all (default 100)
      --log-level L    least severe level logged: debug, info (the
                       default), warning or error
      --log-format F   log lines as "text" (the default: time, level,
                       [pid] or [pid/task id], message) or "json" (one
                       object per line)
      --stats-port N   serve the counters of every server in this process
                       (server:stats()) in Prometheus's text format on
                       http://127.0.0.1:N/metrics; with --workers, worker
                       k serves its own on port N + k (labelled task="k")
  --                   end of options

signals to the supervisor (--workers, or a script that calls
fork_processes or TCPServer:start(n)):
  SIGTERM, SIGINT      forwarded to every worker, which stops gracefully;
                       the supervisor exits 0 once they are gone
  SIGHUP               reload: replace the workers one by one; each new
                       worker re-runs the script (with --workers; else what
                       follows fork_processes) and, once its loop runs, the
                       old one gets SIGTERM and drains. A new worker that
                       dies before its loop runs stops the reload and the
                       old workers keep serving.

systemd socket activation: when LISTEN_FDS and LISTEN_PID (for luahost's
pid) are set, luahost takes the passed sockets before anything else and
keeps them open for every worker and reload; the script serves them with
  server:add_sockets(require("tcpserver.netutil").inherited_sockets())
Sockets shared that way (also those bound before fork_processes) make a
reload lossless. With reuse_port sockets, connections still queued on an
old worker's socket when it closes are reset unless the kernel migrates
them (Linux >= 5.14: sysctl net.ipv4.tcp_migrate_req=1).
]]

local function die(fmt, ...)
  io.stderr:write("luahost: ", fmt:format(...), "\n")
  os.exit(2)
end

local function count_arg(argv, i, flag)
  local v = argv[i + 1]
  local n = v and v:match("^%d+$") and math.tointeger(tonumber(v))
  if not n then die("%s needs a non-negative integer (try --help)", flag) end
  return n
end

-- The word after a flag, one of `allowed` (a set); `names` lists them.
local function word_arg(argv, i, flag, allowed, names)
  local v = argv[i + 1]
  if not allowed[v or ""] then die("%s needs %s (try --help)", flag, names) end
  return v
end

-- Parses the options; returns the settings and the index of the script.
local function parse(argv)
  local i, opts = 1, {chunks = {}}
  while argv[i] and argv[i]:sub(1, 1) == "-" do
    local a = argv[i]
    if a == "-h" or a == "--help" then opts.help = true
    elseif a == "-v" or a == "--version" then opts.version = true
    elseif a == "-e" then
      opts.chunks[#opts.chunks + 1] = argv[i + 1] or die("-e needs an argument")
      i = i + 1
    elseif a == "-w" or a == "--workers" then
      opts.workers = count_arg(argv, i, a)
      i = i + 1
    elseif a == "--gc" then
      opts.gc = word_arg(argv, i, a, {generational = true, incremental = true},
                         "generational or incremental")
      i = i + 1
    elseif a == "--max-restarts" then
      opts.max_restarts = count_arg(argv, i, a)
      i = i + 1
    elseif a == "--log-level" then
      opts.log_level = word_arg(argv, i, a, require("tcpserver.log").levels,
                                "debug, info, warning or error")
      i = i + 1
    elseif a == "--log-format" then
      opts.log_format = word_arg(argv, i, a, {text = true, json = true}, "text or json")
      i = i + 1
    elseif a == "--stats-port" then
      opts.stats_port = count_arg(argv, i, a)
      if opts.stats_port < 1 or opts.stats_port > 65535 then die("--stats-port needs a port (1-65535)") end
      i = i + 1
    elseif a == "--" then i = i + 1; break
    else die("unknown option %s (try --help)", a) end
    i = i + 1
  end
  if opts.max_restarts and not opts.workers then die("--max-restarts needs --workers") end
  return opts, i
end

-- The script failed: in a worker not yet ready, the supervisor reports
-- it (once for all the workers); else it is printed here.
local function fail(message)
  if not require("tcpserver.process").start_failed(message) then
    io.stderr:write("luahost: ", message, "\n")
  end
  return 1
end

-- Takes the sockets systemd passed while LISTEN_PID is still this process.
local function take_inherited_sockets()
  if not os.getenv("LISTEN_FDS") then return end
  local ok, err = pcall(require("tcpserver.netutil").inherited_sockets)
  if not ok then die("%s", err) end
end

-- Forks the workers; returns in each of them (the supervisor stays inside).
local function fork_workers(n, max_restarts)
  require("tcpserver.netutil").default_reuse_port = true
  require("tcpserver.process").fork_processes(n, max_restarts)
end

--- main(argv): argv[0] is the program name, argv[1..] its arguments.
function M.main(argv)
  local opts, i = parse(argv)
  if opts.help then io.stdout:write(M.usage); return 0 end
  if opts.version then
    io.stdout:write("luahost (tcpserver) ", require("tcpserver.core").version, "\n")
    return 0
  end
  local script = argv[i]
  if not script then io.stderr:write(M.usage); return 2 end

  collectgarbage(opts.gc or "generational")
  local log = require "tcpserver.log"
  if opts.log_level then log.set_level(opts.log_level) end
  if opts.log_format then log.set_format(opts.log_format) end
  take_inherited_sockets()
  if opts.workers then fork_workers(opts.workers, opts.max_restarts) end

  local ioloop = require "tcpserver.ioloop"
  local loop = ioloop.current()
  local stopping = false
  local function stop()
    if stopping then return end
    stopping = true
    loop:stop_gracefully()
  end
  loop:add_signal_handler("SIGTERM", stop)
  loop:add_signal_handler("SIGINT", stop)
  if opts.stats_port then
    local ok, err = pcall(require("tcpserver.metrics").serve, opts.stats_port)
    if not ok then die("%s", err) end
  end

  local args = {[-1] = argv[-1] or argv[0], [0] = script}
  for j = i + 1, #argv do args[#args + 1] = argv[j] end
  _G.arg = args

  for _, c in ipairs(opts.chunks) do
    local f, err = load(c, "=(command line)")
    if not f then die("%s", err) end
    f()
  end
  local f, err = loadfile(script)
  if not f then return fail(err) end
  local ok, e = xpcall(f, debug.traceback, table.unpack(args))
  if not ok then return fail(tostring(e)) end
  if not stopping then loop:start() end
  return 0
end


--- Kept for scripts written before the flag parser moved: see
-- tcpserver.flags.
function M.options(...) return require("tcpserver.flags").parse(...) end

--- Kept as well: see tcpserver.metrics.
function M.prometheus_text(...) return require("tcpserver.metrics").prometheus_text(...) end

return M
