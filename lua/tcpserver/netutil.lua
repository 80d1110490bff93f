--- Listening sockets: bind before forking, serve with add_sockets.
local core = require "tcpserver.core"

local M = {}

local FAMILIES = {inet = true, inet6 = true}
local DEFAULT_BACKLOG = 128
local DEFAULT_UNIX_MODE = tonumber("600", 8)

--- Binds listening sockets for every address `address` resolves to (all
-- interfaces for nil or ""). opts: family ("inet", "inet6" or nil for both),
-- backlog (128), reuse_port (false). Returns a list of socket objects.
function M.bind_sockets(port, address, opts)
  if math.type(port) ~= "integer" or port < 0 or port > 65535 then
    error("bind_sockets: port must be an integer from 0 to 65535", 2)
  end
  if address ~= nil and type(address) ~= "string" then
    error("bind_sockets: address must be a string", 2)
  end
  opts = opts or {}
  if type(opts) ~= "table" then error("bind_sockets: opts must be a table", 2) end
  for k in pairs(opts) do
    if k ~= "family" and k ~= "backlog" and k ~= "reuse_port" then
      error("bind_sockets: unknown option '" .. tostring(k) .. "'", 2)
    end
  end
  if opts.family ~= nil and not FAMILIES[opts.family] then
    error("bind_sockets: family must be \"inet\", \"inet6\" or nil", 2)
  end
  local backlog = opts.backlog or DEFAULT_BACKLOG
  if math.type(backlog) ~= "integer" or backlog < 1 then
    error("bind_sockets: backlog must be a positive integer", 2)
  end
  local reuse_port = opts.reuse_port
  if reuse_port == nil then reuse_port = M.default_reuse_port end
  if type(reuse_port) ~= "boolean" then
    error("bind_sockets: reuse_port must be a boolean", 2)
  end
  local ok, socks = pcall(core.bind_sockets, port, address, opts.family, backlog, reuse_port)
  -- The reason says it all ("cannot listen on 127.0.0.1:8888: Address
  -- already in use"): no position inside this module.
  if not ok then error((tostring(socks):gsub("^[^:]+:%d+: ", "")), 0) end
  return socks
end

--- What bind_sockets (and so TCPServer:listen and :bind) uses when
-- opts.reuse_port is nil. `luahost --workers` sets it, so that each worker
-- binds its own socket.
M.default_reuse_port = false

--- Binds a unix stream socket at `path` (a stale socket file is replaced).
function M.bind_unix_socket(path, mode, backlog)
  if type(path) ~= "string" then error("bind_unix_socket: path must be a string", 2) end
  return core.bind_unix_socket(path, mode or DEFAULT_UNIX_MODE, backlog or DEFAULT_BACKLOG)
end

local inherited

--- The listening sockets passed by systemd socket activation (LISTEN_FDS,
-- LISTEN_PID, LISTEN_FDNAMES), as socket objects like bind_sockets gives,
-- each with a `name` when LISTEN_FDNAMES names it. The first call takes
-- them (and unsets the variables, as sd_listen_fds does); later calls, in
-- this process and in the workers it forks, return the same sockets. An
-- empty list when none were passed to this process.
function M.inherited_sockets()
  inherited = inherited or core.inherited_sockets()
  return table.move(inherited, 1, #inherited, 1, {})
end

return M
