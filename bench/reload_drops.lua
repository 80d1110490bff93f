-- Connections lost while workers are reloaded (SIGHUP every 100 ms):
-- 2 workers sharing one listening socket (bound before the fork) versus
-- luahost --workers 2 (a reuse_port socket per worker).
--
--   build/luahost bench/reload_drops.lua [reloads [clients]]
--
-- `clients` tasks connect in a loop (one request each) during `reloads`
-- reloads; the errors are counted by kind. With reuse_port a connection
-- queued on an old worker's socket when it closes is reset, unless
-- net.ipv4.tcp_migrate_req=1 (printed below).
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"

local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
  local line = stream:read_until("\n")
  if line then stream:write(line) end
end})

-- The server side: `luahost reload_drops.lua --serve shared|workers PORT`;
-- in "workers" mode luahost runs it with --workers 2.
local function serve(mode, port)
  local server = Echo()
  if mode == "shared" then
    server:bind(port, "127.0.0.1")
    server:start(2)
  else
    server:listen(port, "127.0.0.1")
  end
  print("ready")
  io.stdout:flush()
end

local function free_port()
  local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
  local _, port = sock:getsockname()
  sock:close()
  return port
end

local function measure(mode, reloads, clients)
  local port = free_port()
  local argv = {arg[-1], arg[0], "--serve", mode, tostring(port)}
  if mode == "workers" then
    table.insert(argv, 2, "--workers")
    table.insert(argv, 3, "2")
  end
  local server = process.Subprocess(argv, {stdout = "pipe", stderr = "null"})
  for _ = 1, 2 do server.stdout:read_until("\n") end
  local ok, errors, stop, running = 0, {}, false, clients
  local done = locks.Event()
  local function client()
    while not stop do
      local stream, err = tcpclient.connect("127.0.0.1", port)
      local reply
      if stream then
        stream:write("hi\n")
        reply, err = stream:read_until("\n")
        stream:close()
      end
      if reply then ok = ok + 1 else errors[err] = (errors[err] or 0) + 1 end
    end
    running = running - 1
    if running == 0 then done:set() end
  end
  for _ = 1, clients do ioloop.current():spawn(client) end
  for _ = 1, reloads do
    ioloop.sleep(0.1)
    server:kill(1)
  end
  ioloop.sleep(0.5)
  stop = true
  done:wait()
  server:kill(15)
  server:wait_for_exit()
  return ok, errors
end

local function main()
  local reloads = tonumber(arg[1]) or 30
  local clients = tonumber(arg[2]) or 4
  local f = io.open("/proc/sys/net/ipv4/tcp_migrate_req")
  local migrate = f and f:read("l") or "n/a"
  if f then f:close() end
  print(("%d reloads, %d clients, net.ipv4.tcp_migrate_req=%s"):format(reloads, clients, migrate))
  for _, mode in ipairs {"shared", "workers"} do
    local ok, errors = measure(mode, reloads, clients)
    local list = {}
    for err, n in pairs(errors) do list[#list + 1] = ("%s: %d"):format(err, n) end
    print(("%-8s %8d ok   errors: %s"):format(mode, ok, #list > 0 and table.concat(list, ", ") or "none"))
  end
end

if arg[1] == "--serve" then
  serve(arg[2], tonumber(arg[3]))
else
  ioloop.current():run_sync(main)
end
