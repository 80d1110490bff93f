-- How accepts spread across 2 forked workers: one listening socket shared
-- by both (bound before fork_processes, as TCPServer:bind + start(2)) versus
-- a reuse_port socket per worker (as luahost --workers 2).
--
--   build/luahost bench/studies/accept_spread.lua [connections [concurrency ...]]
--
-- Each worker answers a connection with its task id and closes it; the
-- driver makes `connections` connections with each concurrency (default
-- 1 and 32) and counts the answers per worker.
package.path = arg[0]:gsub("[^/]*$", "../../tools/?.lua;") .. package.path
local M = require "multiproc"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"

local WORKERS = 2

local Reply = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
  stream:write(process.task_id() .. "\n")
end})

-- The server side: `luahost accept_spread.lua --serve shared|reuse_port PORT`.
local function serve(mode, port)
  if mode == "shared" then
    local socks = netutil.bind_sockets(port, "127.0.0.1")
    process.fork_processes(WORKERS)
    Reply():add_sockets(socks)
  else
    process.fork_processes(WORKERS)
    Reply():listen(port, "127.0.0.1", {reuse_port = true})
  end
  print("ready " .. process.task_id())
  io.stdout:flush()
end

-- Makes `total` connections, `concurrency` at a time; returns the count
-- per task id and the number of failures.
local function drive(port, total, concurrency)
  local counts, failed, left = {}, 0, total
  for id = 0, WORKERS - 1 do counts[id] = 0 end
  M.spawn_clients(concurrency, function()
    while left > 0 do
      left = left - 1
      local stream = tcpclient.connect("127.0.0.1", port)
      local id = stream and stream:read_until("\n")
      if id then
        counts[tonumber(id)] = counts[tonumber(id)] + 1
      else
        failed = failed + 1
      end
      if stream then stream:close() end
    end
  end)()
  return counts, failed
end

local function measure(mode, total, concurrency)
  local port = M.free_port()
  local server = M.start_server(mode, port, WORKERS)
  local counts, failed = drive(port, total, concurrency)
  M.stop_server(server)
  return counts, failed
end

local function main()
  local total = tonumber(arg[1]) or 4000
  local concurrencies = {}
  for i = 2, #arg do concurrencies[#concurrencies + 1] = tonumber(arg[i]) end
  if #concurrencies == 0 then concurrencies = {1, 32} end
  print(("%d connections per run, %d workers, %d CPUs"):format(total, WORKERS, process.cpu_count()))
  print(("%-11s %11s %9s %9s %9s %7s"):format("socket", "concurrency", "worker 0", "worker 1",
                                               "failed", "max %"))
  for _, mode in ipairs {"shared", "reuse_port"} do
    for _, c in ipairs(concurrencies) do
      local counts, failed = measure(mode, total, c)
      local max = math.max(counts[0], counts[1])
      print(("%-11s %11d %9d %9d %9d %6.1f%%"):format(mode, c, counts[0], counts[1], failed,
                                                     100 * max / (counts[0] + counts[1])))
    end
  end
end

M.run(serve, main)
