-- What tools/soak.lua and the multi-process studies (bench/studies/
-- accept_spread.lua, reload_drops.lua) share: a free port, the script
-- itself started again as the server, and client tasks that run until
-- they are done.
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"

local M = {}

--- A port that nothing listens on right now: the servers bind it
-- themselves, some with reuse_port.
function M.free_port()
  local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
  local _, port = sock:getsockname()
  sock:close()
  return port
end

--- Starts `luahost [flags] <this script> --serve mode port` and waits for
-- `ready` lines, one per process that serves.
function M.start_server(mode, port, ready, flags)
  local argv = {arg[-1]}
  for _, flag in ipairs(flags or {}) do argv[#argv + 1] = flag end
  for _, a in ipairs {arg[0], "--serve", mode, tostring(port)} do argv[#argv + 1] = a end
  local server = process.Subprocess(argv, {stdout = "pipe", stderr = "null"})
  for _ = 1, ready do server.stdout:read_until("\n") end
  return server
end

function M.stop_server(server)
  server:kill(15)
  server:wait_for_exit()
end

--- Runs `client` in `n` tasks; returns a function that waits for all.
function M.spawn_clients(n, client)
  local running, done = n, locks.Event()
  for _ = 1, n do
    ioloop.current():spawn(function()
      client()
      running = running - 1
      if running == 0 then done:set() end
    end)
  end
  return function() done:wait() end
end

--- The script's entry point: the server side when run with --serve,
-- else `main` as the driver.
function M.run(serve, main)
  if arg[1] == "--serve" then
    serve(arg[2], tonumber(arg[3]))
  else
    ioloop.current():run_sync(main)
  end
end

return M
