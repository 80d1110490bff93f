--- IOStream: the stream methods live in C (tcpserver.core); this module
-- adds the few that are policy, and exposes the method table.
local core = require "tcpserver.core"

local M = {}

local methods = debug.getregistry()["tcpserver.stream"].__index

--- Plain streams have no handshake: it is always done.
if not methods.wait_for_handshake then
  function methods.wait_for_handshake(stream)
    if stream:closed() then return nil, "closed" end
    return true
  end
  function methods.peer_certificate() return nil end
  function methods.alpn_protocol() return nil end
  function methods.tls_version() return nil end
  function methods.cipher() return nil end
end

M.IOStream = methods
M.core = core
return M
