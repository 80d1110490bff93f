--- LuaSocket's TCP API over the loop, so that client libraries written for
-- LuaSocket run inside a task unchanged: `require("tcpserver.socket")
-- .install()` makes a later `require "socket"` return this module (Debian's
-- lua-redis, for one, then works as it is). The face is thin: each object
-- holds a tcpserver stream (one buffer, one I/O path), and its calls
-- yield the task where LuaSocket's would block the process.
--
-- As LuaSocket: success returns 1; errors are nil and LuaSocket's strings
-- ("closed", "timeout", "connection refused"); `settimeout(0)` polls, nil
-- or a negative value means no limit; "*l" drops every CR; a bad host is
-- nil, err. OpenResty's names keep their meaning, in seconds:
-- `settimeouts(connect, send, read)`, `setkeepalive([idle [, size]])`,
-- `getreusedtimes()`, `sslhandshake(reused, server_name, verify)`, and
-- connect's options `{pool =, pool_size =, backlog =}`.
local core = require "tcpserver.core"
local ioloop = require "tcpserver.ioloop"
local pool = require "tcpserver.pool"
local tcpclient = require "tcpserver.tcpclient"

local M = {_VERSION = "LuaSocket 3.0 (tcpserver)"}

local TCP = {}
TCP.__index = TCP
TCP.__name = "tcp{client}"

function TCP:__tostring()
  return ("tcp{%s}: %p"):format(self.stream and "client" or "master", self)
end

--- tcp() -> a new, unconnected TCP object.
function M.tcp()
  return setmetatable({created = core.gettime(), received = 0, sent = 0}, TCP)
end
M.tcp4, M.tcp6 = M.tcp, M.tcp

-- Runs fn(...) under the object's timeout for `kind` ("connect", "send"
-- or "read"): none, 0 (poll) or seconds. A timeout covers the whole call,
-- as LuaSocket's "t" mode; its "b" mode (per blocking step) is the same
-- for a call that waits once, which is every call here.
local function timed(self, kind, fn, ...)
  local t = self.timeouts and self.timeouts[kind]
  if t == nil then return fn(...) end
  local r = table.pack(ioloop.with_timeout(t, fn, ...))
  return table.unpack(r, 1, r.n)
end

local function err_name(err)
  if err == "connection refused" or err == "timeout" or err == "closed" then return err end
  if err and err:match("^cannot resolve") then return "host not found" end
  return err
end

--- connect(host, port [, opts]) -> 1, or nil, err. opts: pool, pool_size,
-- backlog (tcpserver.pool).
function TCP:connect(host, port, opts)
  if self.stream then return nil, "already connected" end
  if type(host) ~= "string" or host == "" then return nil, "host not found" end
  port = math.tointeger(tonumber(port))
  if not port or port < 1 or port > 65535 then return nil, "invalid port" end
  local copts = {}
  for k, v in pairs(opts or {}) do copts[k] = v end
  local t = self.timeouts and self.timeouts.connect
  if t and t > 0 then copts.timeout = t end
  local stream, err = timed(self, "connect", tcpclient.connect, host, port, copts)
  if not stream then return nil, err_name(err) end
  self.stream, self.host, self.port = stream, host, port
  return 1
end

--- settimeout(t [, mode]) -> 1: every later call's limit (seconds; 0
-- polls; nil or negative: none). mode "b" or "t" (see `timed`).
function TCP:settimeout(t, mode)
  if mode ~= nil and mode ~= "b" and mode ~= "t" and mode ~= "r" then
    error("settimeout: mode must be \"b\" or \"t\"", 2)
  end
  if t ~= nil and type(t) ~= "number" then error("settimeout: number expected", 2) end
  if t == nil or t < 0 then
    self.timeouts = nil
  else
    self.timeouts = {connect = t, send = t, read = t}
  end
  return 1
end

--- settimeouts(connect, send, read) -> 1 (OpenResty's, in seconds).
function TCP:settimeouts(connect, send, read)
  local function pick(v) return v ~= nil and v >= 0 and v or nil end
  self.timeouts = {connect = pick(connect), send = pick(send), read = pick(read)}
  return 1
end

-- write, then hand it to the kernel (as LuaSocket's send returns once the
-- bytes are in the socket's buffer).
local function send_all(stream, chunk)
  local ok, err = stream:write(chunk)
  if not ok then return nil, err end
  return stream:flush()
end

--- send(data [, i [, j]]) -> the index of the last byte sent, or nil,
-- err, the last index sent.
function TCP:send(data, i, j)
  local stream = self.stream
  if not stream then return nil, "closed", 0 end
  data = tostring(data)
  i, j = i or 1, j or #data
  if i < 0 then i = math.max(#data + i + 1, 1) end
  if j < 0 then j = #data + j + 1 end
  local chunk = (i == 1 and j == #data) and data or data:sub(i, j)
  local ok, err
  if self.timeouts and self.timeouts.send then
    ok, err = timed(self, "send", send_all, stream, chunk)
  else
    ok, err = send_all(stream, chunk)
  end
  if not ok then return nil, err_name(err), i - 1 end
  self.sent = self.sent + #chunk
  return math.max(j, i - 1)
end

-- The reads of receive, by pattern.
local find, sub, gsub = string.find, string.sub, string.gsub

local function read_line(stream)
  local line, err, partial = stream:read_until("\n")
  if not line then return nil, err, partial and gsub(partial, "\r", "") or "" end
  line = sub(line, 1, -2)
  if find(line, "\r", 1, true) then line = gsub(line, "\r", "") end
  return line
end

local function read_all(stream)
  local data, err, partial = stream:read_until_close()
  if data then return data end
  if err == "closed" then return partial or "" end -- the end is no error for "*a"
  return nil, err, partial or ""
end

local function read_count(stream, n)
  local data, err, partial = stream:read_bytes(n)
  if not data then return nil, err, partial or "" end
  return data
end

--- receive([pattern [, prefix]]) -> data, or nil, err, partial. pattern:
-- "*l" or "l" (a line, its CR and LF dropped; the default), "*a" or "a"
-- (all until the end), or a byte count.
function TCP:receive(pattern, prefix)
  local stream = self.stream
  if not stream then return nil, "closed", prefix or "" end
  pattern = pattern or "*l"
  if (pattern == "*l" or pattern == "l") and not prefix and not self.timeouts then
    local line, err, partial = read_line(stream) -- the common call, direct
    if line then
      self.received = self.received + #line
      return line
    end
    return nil, err_name(err), partial
  end
  local fn, arg
  if pattern == "*l" or pattern == "l" then
    fn = read_line
  elseif pattern == "*a" or pattern == "a" then
    fn = read_all
  elseif math.type(tonumber(pattern)) then
    arg = math.tointeger(tonumber(pattern))
    if not arg or arg < 0 then error("receive: invalid pattern", 2) end
    if arg == 0 then return (prefix or "") end
    fn = read_count
  else
    error("receive: invalid pattern", 2)
  end
  local data, err, partial = timed(self, "read", fn, stream, arg)
  if data then
    self.received = self.received + #data
    return prefix and prefix .. data or data
  end
  return nil, err_name(err), (prefix or "") .. (partial or "")
end

--- close() -> 1.
function TCP:close()
  if self.stream then self.stream:close() end
  self.stream = nil
  return 1
end

--- shutdown([how]) -> 1: "send" half-closes, "both" (the default) closes.
function TCP:shutdown(how)
  if not self.stream then return nil, "closed" end
  local ok, err = self.stream:shutdown(how or "both")
  if not ok then return nil, err end
  if (how or "both") == "both" then self.stream = nil end
  return 1
end

--- getpeername(), getsockname() -> address, port, family.
function TCP:getpeername()
  if not self.stream then return nil, "closed" end
  return self.stream:getpeername()
end

function TCP:getsockname()
  if not self.stream then return nil, "closed" end
  return self.stream:getsockname()
end

--- setoption(name, value) -> 1; getoption(name) -> value.
function TCP:setoption(name, value)
  if not self.stream then return nil, "closed" end
  local ok, err = self.stream:setoption(name, value)
  if not ok then return nil, err end
  return 1
end

function TCP:getoption(name)
  if not self.stream then return nil, "closed" end
  return self.stream:getoption(name)
end

--- getstats() -> bytes received, bytes sent, seconds since made.
function TCP:getstats()
  return self.received, self.sent, core.gettime() - self.created
end

--- dirty() -> whether received bytes wait unread.
function TCP:dirty()
  return self.stream ~= nil and self.stream:buffer_sizes() > 0
end

--- setkeepalive([idle_timeout [, pool_size]]) -> 1, or nil, err: puts the
-- connection back into its pool; this object is closed after.
function TCP:setkeepalive(idle_timeout, pool_size)
  local stream = self.stream
  if not stream then return nil, "closed" end
  self.stream = nil
  local ok, err = pool.keepalive(stream, nil, idle_timeout, pool_size)
  if not ok then return nil, err end
  return 1
end

--- getreusedtimes() -> how many times the pool handed this connection out again.
function TCP:getreusedtimes()
  if not self.stream then return nil, "closed" end
  return pool.reused_times(self.stream)
end

--- sslhandshake([reused_session [, server_name [, ssl_verify]]]) -> true,
-- or nil, err (OpenResty's). With ssl_verify the server's certificate is
-- checked against the system CAs (or `self.ssl_options`).
function TCP:sslhandshake(_, server_name, verify)
  local stream = self.stream
  if not stream then return nil, "closed" end
  local opts = {}
  for k, v in pairs(self.ssl_options or {}) do opts[k] = v end
  if not verify then opts.verify = "none" end
  if verify and not server_name then server_name = self.host end
  local ok, err = timed(self, "connect", stream.start_tls, stream, false, opts, server_name)
  if not ok then return nil, err end
  return true
end

--- connect(host, port [, locaddr [, locport]]) -> a connected object, or
-- nil, err.
function M.connect(host, port, locaddr)
  local sock = M.tcp()
  local ok, err = sock:connect(host, port, locaddr and {source_ip = locaddr} or nil)
  if not ok then return nil, err end
  return sock
end

--- gettime() -> seconds since the epoch.
M.gettime = core.gettime

--- sleep(seconds): in a task, yields it (LuaSocket's blocks the process).
function M.sleep(seconds)
  if seconds and seconds > 0 then ioloop.sleep(seconds) end
end

M.dns = {}

--- dns.toip(name) -> the first address, and {name =, ip = {...}}; or nil, err.
function M.dns.toip(name)
  if core.resolve == nil or type(name) ~= "string" then return nil, "host not found" end
  local ips = core.resolve(name)
  if not ips or #ips == 0 then return nil, "host not found" end
  return ips[1], {name = name, alias = {}, ip = ips}
end

--- dns.gethostname() -> this machine's name.
function M.dns.gethostname()
  return core.gethostname()
end

M.ssl = {}

local Wrapped = {}
Wrapped.__index = function(self, k)
  local m = Wrapped[k]
  if m then return m end
  local v = self.sock[k] -- the TCP object's methods, on the same stream
  if type(v) == "function" then return function(_, ...) return v(self.sock, ...) end end
  return v
end

--- ssl.wrap(sock, params) -> an object with LuaSec's dohandshake() and
-- sni(name); params are ssl_options (LuaSec's names are accepted).
function M.ssl.wrap(sock, params)
  if getmetatable(sock) ~= TCP then return nil, "wrap: a tcpserver.socket object expected" end
  return setmetatable({sock = sock, params = params or {}}, Wrapped)
end

function Wrapped:sni(name)
  self.server_name = name
end

--- dohandshake() -> true, or nil, err.
function Wrapped:dohandshake()
  local stream = self.sock.stream
  if not stream then return nil, "closed" end
  local name = self.server_name or self.sock.host
  local ok, err = timed(self.sock, "connect", stream.start_tls, stream, false, self.params, name)
  if not ok then return nil, err end
  return true
end

--- install(): `require "socket"` returns this module from now on.
function M.install()
  package.loaded.socket = M
  return M
end

return M
