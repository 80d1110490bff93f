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
  local ctx
  if opts.ssl_options ~= nil then
    ctx = require("tcpserver.ssl").wrap(opts.ssl_options)
  elseif opts.server_hostname ~= nil then
    error("connect: server_hostname needs ssl_options", 2)
  end
  local started = core.time()
  local stream, err = core.connect(host, port, opts.timeout, opts.source_ip)
  if not stream or not ctx then return stream, err end
  local left = opts.timeout and math.max(opts.timeout - (core.time() - started), 0.001)
  local ok
  ok, err = stream:_start_tls(false, ctx, opts.server_hostname or host, left)
  if ok then ok, err = stream:wait_for_handshake() end
  if not ok then
    stream:close()
    if err == "tls: handshake timed out" then err = "timeout" end
    return nil, err
  end
  return stream
end

return M
