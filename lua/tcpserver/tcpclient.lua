--- Outgoing connections.
local core = require "tcpserver.core"
local pool = require "tcpserver.pool"
require "tcpserver.iostream"

local M = {}

local OPTIONS = {timeout = true, source_ip = true, ssl_options = true, server_hostname = true,
                 pool = true, pool_size = true, backlog = true}

--- connect(host, port [, opts]) -> stream or nil, err. opts: timeout
-- (covers resolving, connecting and the TLS handshake), source_ip,
-- ssl_options, server_hostname, and the pool's (tcpserver.pool): pool
-- (its name; host:port by default), pool_size, backlog. An idle stream
-- of the pool is taken first; stream:set_keepalive() puts one back. `host` "unix:/path" connects to a unix
-- socket; then port is nil. Must run in a task; resolution and connection
-- never block the loop.
function M.connect(host, port, opts)
  if type(host) ~= "string" or host == "" then error("connect: host must be a non-empty string", 2) end
  if host:find("\0", 1, true) then error("connect: host contains a NUL byte", 2) end
  local path = host:match("^unix:(.+)$")
  if path and port ~= nil then
    error("connect: a unix socket (" .. host .. ") takes no port", 2)
  elseif not path and (math.type(port) ~= "integer" or port < 1 or port > 65535) then
    error("connect: port must be an integer from 1 to 65535", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not OPTIONS[k] then error("connect: unknown option '" .. tostring(k) .. "'", 2) end
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error("connect: timeout must be a positive number of seconds", 2)
  end
  if path and opts.source_ip ~= nil then error("connect: source_ip is for TCP", 2) end
  local ctx, name
  if opts.ssl_options ~= nil then
    ctx = require("tcpserver.ssl").wrap(opts.ssl_options)
    if opts.server_hostname ~= nil and type(opts.server_hostname) ~= "string" then
      error("connect: server_hostname must be a string", 2)
    end
    -- checked before connecting, as Python's ssl does: "", ".x" and a NUL
    -- would each switch the certificate's name check off or cut it short
    name = opts.server_hostname or not path and host or nil
    if name then
      local ok, e = pcall(core.check_server_name, name, "connect")
      if not ok then error(e, 2) end
      name = e
    end
  elseif opts.server_hostname ~= nil then
    error("connect: server_hostname needs ssl_options", 2)
  end
  if opts.pool ~= nil and type(opts.pool) ~= "string" then
    error("connect: pool must be a string", 2)
  end
  local pool_name = opts.pool or (path and host or host .. ":" .. port)
  local stream, err, release = pool.take(pool_name, opts)
  if stream or err then return stream, err end
  local started = core.time()
  if path then
    stream, err = core.connect_unix(path, opts.timeout)
  else
    stream, err = core.connect(host, port, opts.timeout, opts.source_ip)
  end
  if not stream then
    if release then release() end
    return nil, err
  end
  pool.track(stream, pool_name, release)
  if not ctx then return stream end
  local left = opts.timeout and math.max(opts.timeout - (core.time() - started), 0.001)
  local ok
  ok, err = stream:_start_tls(false, ctx, name, left)
  if ok then ok, err = stream:wait_for_handshake() end
  if not ok then
    stream:close()
    if err == "tls: handshake timed out" then err = "timeout" end
    return nil, err
  end
  return stream
end

return M
