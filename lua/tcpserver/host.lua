--- What the luahost executable runs: a script under the loop, with
-- SIGINT/SIGTERM stopping it gracefully; with --workers, N copies of it
-- under one supervisor.
local M = {}

M.usage = [[
usage: luahost [options] script.lua [args...]

Runs script.lua with the tcpserver modules available, then runs the event
loop until nothing is left to do or the process is told to stop.
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

-- Prometheus's text format (version 0.0.4) for tcpserver.stats().
local METRICS = {
  {"connections_open", "gauge", "Connections whose handler is running."},
  {"connections_total", "counter", "Connections accepted."},
  {"bytes_in", "counter", "Bytes read from the streams (after TLS)."},
  {"bytes_out", "counter", "Bytes written to the streams (before TLS)."},
  {"handler_errors", "counter", "handle_stream calls that raised an error."},
  {"tls_handshake_failures", "counter", "TLS handshakes that failed."},
}

--- The metrics text for a stats table (from server:stats() or
-- tcpserver.stats()); `task` (a worker's task id) becomes a label.
function M.prometheus_text(stats, task)
  local out = {}
  local labels = task and ('{task="%d"}'):format(task) or ""
  for _, m in ipairs(METRICS) do
    local key, kind, help = m[1], m[2], m[3]
    local name = "tcpserver_" .. key
    if kind == "counter" and not name:match("_total$") then name = name .. "_total" end
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n%s%s %d\n"):format(
      name, help, name, kind, name, labels, math.tointeger(stats[key]) or 0)
  end
  return table.concat(out)
end

-- A minimal HTTP/1.1 responder for GET /metrics on 127.0.0.1:port.
local function serve_stats(port)
  local tcpserver = require "tcpserver"
  local process = require "tcpserver.process"
  local Stats = tcpserver.TCPServer:extend()
  function Stats:handle_stream(stream)
    stream:settimeout(10)
    local head = stream:read_until("\r\n\r\n", 8192)
    if not head then return end
    local method, path = head:match("^(%u+) (%S+) HTTP/1%.[01]\r\n")
    local status, body, ctype = "404 Not Found", "not found: try /metrics\n", "text/plain"
    if not method then
      status, body = "400 Bad Request", "bad request\n"
    elseif path == "/metrics" or path == "/" then
      status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
      -- the task id of the process that answers: a script that forks
      -- after this shares the port among its workers
      body = method == "HEAD" and "" or M.prometheus_text(tcpserver.stats(), process.task_id())
    end
    stream:write(("HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                  .. "Connection: close\r\n\r\n%s"):format(status, ctype, #body, body))
  end
  local server = Stats()
  rawget(server, "_tcpserver").internal = true -- left out of tcpserver.stats()
  -- A worker's port is its task id's: during a reload (SIGHUP) the new
  -- worker binds it while the old one still serves it, as with every
  -- listener of a worker. A lone process keeps it to itself.
  local task = process.task_id()
  local ok, err = pcall(server.listen, server, port + (task or 0), "127.0.0.1",
                        {reuse_port = task ~= nil})
  if not ok then die("--stats-port: %s", tostring(err)) end
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
  if opts.stats_port then serve_stats(opts.stats_port) end

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

--- For the scripts luahost runs (the examples use it): reads `--name value`
-- and `--name=value` flags from `argv` (the script's `arg`) into a copy of
-- `defaults`, whose keys are the names allowed (`max_queue` is
-- `--max-queue`). A name whose default is a number takes a number (an
-- integer if the default is one); a default of false stands for a string
-- that may be left out. Bare words fill the names in `positional`, in
-- order (`luahost examples/echo.lua 8888`). `--help` prints the usage and
-- exits 0; anything else wrong prints it with the reason and exits 2.
function M.options(argv, defaults, positional)
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
