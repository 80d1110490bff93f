-- Connections lost while workers are reloaded (SIGHUP every 100 ms):
-- 2 workers sharing one listening socket (bound before the fork) versus
-- luahost --workers 2 (a reuse_port socket per worker).
--
--   build/luahost bench/studies/reload_drops.lua [reloads [clients]]
--
-- `clients` tasks connect in a loop (one request each) during `reloads`
-- reloads; the errors are counted by kind. With reuse_port a connection
-- queued on an old worker's socket when it closes is reset, unless
-- net.ipv4.tcp_migrate_req=1 (printed below).
package.path = arg[0]:gsub("[^/]*$", "../../tools/?.lua;") .. package.path
local M = require "multiproc"
local ioloop = require "tcpserver.ioloop"
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

local function measure(mode, reloads, clients)
  local port = M.free_port()
  local server = M.start_server(mode, port, 2, mode == "workers" and {"--workers", "2"} or nil)
  local ok, errors, stop = 0, {}, false
  local wait = M.spawn_clients(clients, function()
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
  end)
  for _ = 1, reloads do
    ioloop.sleep(0.1)
    server:kill(1)
  end
  ioloop.sleep(0.5)
  stop = true
  wait()
  M.stop_server(server)
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

M.run(serve, main)
