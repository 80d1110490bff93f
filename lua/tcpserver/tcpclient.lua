--- Outgoing connections.
local core = require "tcpserver.core"
require "tcpserver.iostream"

local M = {}

local OPTIONS = {timeout = true, source_ip = true, ssl_options = true, server_hostname = true}

--- connect(host, port [, {timeout=, source_ip=}]) -> stream or nil, err.
-- Must run in a task; resolution and connection never block the loop.
function M.connect(host, port, opts)
  if type(host) ~= "string" or host == "" then error("connect: host must be a non-empty string", 2) end
  if math.type(port) ~= "integer" or port < 1 or port > 65535 then
    error("connect: port must be an integer from 1 to 65535", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not OPTIONS[k] then error("connect: unknown option '" .. tostring(k) .. "'", 2) end
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error("connect: timeout must be a positive number of seconds", 2)
  end
  if opts.ssl_options ~= nil then
    error("connect: TLS is not available in this build", 2)
  end
  return core.connect(host, port, opts.timeout, opts.source_ip)
end

return M
