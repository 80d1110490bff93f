--- Helpers for busted specs.
local ioloop = require "tcpserver.ioloop"
local netutil = require "tcpserver.netutil"

local M = {}

--- Wraps a spec body so that it runs as a task on the loop, failing after
-- `timeout` seconds (10 by default).
function M.async(fn, timeout)
  return function(...)
    local args = table.pack(...)
    return ioloop.current():run_sync(function()
      return fn(table.unpack(args, 1, args.n))
    end, timeout or 10)
  end
end

--- A listening socket on 127.0.0.1 with a port the kernel picked.
function M.bind_unused_port(address)
  local sock = netutil.bind_sockets(0, address or "127.0.0.1", {family = address and nil or "inet"})[1]
  local _, port = sock:getsockname()
  return sock, port
end

return M
