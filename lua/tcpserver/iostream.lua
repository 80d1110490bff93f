--- IOStream: the stream methods live in C (tcpserver.core); this module
-- adds the few that are policy, and exposes the method table.
local core = require "tcpserver.core"

local M = {}

local methods = core.stream_mt.__index

--- start_tls(server_side, ssl_options [, server_hostname]): upgrades the
-- stream in place (STARTTLS) and waits for the handshake: true or nil, err.
-- Raises if a read or write is pending or unread plain data is buffered.
function methods.start_tls(stream, server_side, ssl_options, server_hostname, timeout)
  local ssl = require "tcpserver.ssl"
  local ctx = server_side and ssl.server_context(ssl_options) or ssl.wrap(ssl_options)
  local ok, err = stream:flush()
  if not ok then return nil, err end
  ok, err = stream:_start_tls(server_side, ctx, server_hostname, timeout)
  if not ok then return nil, err end
  return stream:wait_for_handshake()
end

M.IOStream = methods
M.core = core
return M
