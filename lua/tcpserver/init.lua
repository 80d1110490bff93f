--- tcpserver: Tornado's TCPServer for Lua 5.4.
-- Subclass TCPServer, override handle_stream(stream, address); each
-- connection runs it in its own task.
local core = require "tcpserver.core"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"
local netutil = require "tcpserver.netutil"
require "tcpserver.iostream"

local M = {_VERSION = core.version}

local MiB = 1024 * 1024

local DEFAULTS = {
  max_buffer_size = 100 * MiB,
  read_chunk_size = 64 * 1024,
  handshake_timeout = 10,
  shutdown_timeout = 10,
  in_stats = true,
}

local CHECKS = {
  ssl_options = "ssl",
  max_buffer_size = "size",
  read_chunk_size = "size",
  max_connections = "size",
  handshake_timeout = "seconds",
  idle_timeout = "seconds",
  shutdown_timeout = "seconds",
  proxy_protocol = "boolean",
  in_stats = "boolean",
  on_error = "function",
}

-- Levenshtein distance, bounded: enough to tell a typo from a new name.
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = {[0] = i}
    for j = 1, #b do
      local cost = a:byte(i) == b:byte(j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

-- The TCPServer option that `k` is a near miss of (two edits at most), if any.
local function near_miss(k)
  if type(k) ~= "string" then return nil end
  for name in pairs(CHECKS) do
    if distance(k, name) <= 2 then return name end
  end
end

-- Checks a TCPServer option. A key TCPServer does not know is left to the
-- subclass when it defines initialize (returns false), unless it is a
-- near miss of one of TCPServer's own names: that is a typo.
local function check_option(k, v, subclass_takes_unknown)
  local kind = CHECKS[k]
  if not kind then
    local near = near_miss(k)
    if near then
      error(("TCPServer: unknown option '%s' (did you mean '%s'?)"):format(k, near), 4)
    end
    if subclass_takes_unknown then return false end
    error("TCPServer: unknown option '" .. tostring(k)
          .. "' (a subclass takes options of its own in initialize(opts))", 4)
  end
  local ok
  if kind == "size" then ok = math.type(v) == "integer" and v > 0 and v < (1 << 32) - 1
  elseif kind == "seconds" then ok = type(v) == "number" and v > 0
  elseif kind == "ssl" then ok = type(v) == "table" or type(v) == "userdata"
  else ok = type(v) == kind end
  if not ok then
    local want = kind == "size" and "a positive integer below 4 GiB"
      or kind == "seconds" and "a positive number of seconds"
      or kind == "ssl" and "a table or an ssl context" or "a " .. kind
    error(("TCPServer: option '%s' must be %s, got %s"):format(k, want, tostring(v)), 4)
  end
  return true
end

local servers = setmetatable({}, {__mode = "k"})

local function init(self, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("TCPServer: options must be a table", 3)
  end
  local options = {}
  for k, v in pairs(DEFAULTS) do options[k] = v end
  local subclass_takes_unknown = self.initialize ~= nil
  for k, v in pairs(opts or {}) do
    if check_option(k, v, subclass_takes_unknown) then options[k] = v end
  end
  if options.ssl_options then
    options.ssl_context = require("tcpserver.ssl").server_context(options.ssl_options)
  end
  local state = {
    options = options, listeners = {}, pending = {},
    nstreams = 0, paused = false, drained = {},
    connections_total = 0, handler_errors = 0, closed_counts = {},
  }
  rawset(self, "_tcpserver", state)
  servers[self] = true
  return state
end

-- A plain table used as a server gets its state on first use.
local function state_of(self)
  return rawget(self, "_tcpserver") or init(self, nil)
end

local TCPServer = {}
TCPServer.__index = TCPServer

local function construct(class, opts)
  if rawget(class, "__index") == nil then rawset(class, "__index", class) end
  local self = setmetatable({}, class)
  init(self, opts)
  if self.initialize then self:initialize(opts) end
  return self
end

setmetatable(TCPServer, {__call = construct})

--- A subclass: fields of `class` (optional) override TCPServer's.
function TCPServer:extend(class)
  class = class or {}
  class.__index = class
  return setmetatable(class, {__index = self, __call = construct})
end

function TCPServer:new(opts)
  return construct(self, opts)
end

function TCPServer:handle_stream(stream, address) -- luacheck: ignore 212
  error("handle_stream is not implemented: override it in a subclass", 2)
end

-- The host and port of a peer; family is "inet" unless the table says
-- otherwise (the core leaves it out for IPv4: one field less per idle
-- connection).
local Address = {family = "inet"}
Address.__index = Address
function Address:__tostring()
  if self.family == "inet6" then return ("[%s]:%d"):format(self.host, self.port) end
  if self.family == "unix" then return "unix:" .. self.host end
  return ("%s:%d"):format(self.host, self.port)
end
M.Address = Address

local function set_paused(state, paused)
  if state.paused == paused then return end
  state.paused = paused
  for _, listener in ipairs(state.listeners) do listener:pause(paused) end
end

function TCPServer:_report(err, traceback, address)
  local on_error = self._tcpserver.options.on_error
  if on_error then
    local ok, e = pcall(on_error, self, err, traceback, address)
    if ok then return end
    log.error("on_error failed: %s", tostring(e))
  end
  log.error("Uncaught error in handle_stream for %s: %s", tostring(address), traceback)
end

-- What the core needs to serve a connection: handle_stream runs in a task
-- of its own (no frame wraps it, which keeps an idle connection small);
-- begin and done keep the books. The core calls done when the task ends.
local function make_handler(self, state)
  local max = state.options.max_connections
  local handler = {server = self, Address = Address}

  function handler.begin()
    state.nstreams = state.nstreams + 1
    state.connections_total = state.connections_total + 1
    if max and state.nstreams >= max then set_paused(state, true) end
  end

  function handler.done(stream, address, failed, err, traceback)
    if failed then -- in a task of its own: on_error may wait
      state.handler_errors = state.handler_errors + 1
      core.spawn(self._report, self, err, traceback, address)
    end
    stream:close()
    state.nstreams = state.nstreams - 1
    if max and state.nstreams < max and not state.stopped then set_paused(state, false) end
    if state.nstreams == 0 and #state.drained > 0 then
      local callbacks = state.drained
      state.drained = {}
      for _, fn in ipairs(callbacks) do fn() end
    end
  end

  return handler
end

--- Starts accepting on already bound sockets.
function TCPServer:add_socket(sock)
  local state = state_of(self)
  state.stopped = false
  state.handler = state.handler or make_handler(self, state)
  local listener = core.listener(sock, state.options, state.handler)
  if state.paused then listener:pause(true) end
  state.listeners[#state.listeners + 1] = listener
end

function TCPServer:add_sockets(socks)
  if type(socks) ~= "table" then error("add_sockets: list of sockets expected", 2) end
  for _, sock in ipairs(socks) do self:add_socket(sock) end
end

--- Binds and serves at once; returns the bound port (useful with port 0).
function TCPServer:listen(port, address, opts)
  local socks = netutil.bind_sockets(port, address, opts)
  self:add_sockets(socks)
  return (select(2, socks[1]:getsockname()))
end

--- Binds now, serves after start(); returns the bound port.
function TCPServer:bind(port, address, opts)
  local state = state_of(self)
  local socks = netutil.bind_sockets(port, address, opts)
  for _, sock in ipairs(socks) do state.pending[#state.pending + 1] = sock end
  return (select(2, socks[1]:getsockname()))
end

--- Serves the sockets from bind(); num_processes other than 1 forks first.
function TCPServer:start(num_processes, max_restarts)
  local state = state_of(self)
  num_processes = num_processes or 1
  if num_processes ~= 1 then
    local process = require "tcpserver.process"
    process.fork_processes(num_processes, max_restarts)
  end
  local pending = state.pending
  state.pending = {}
  self:add_sockets(pending)
end

-- The C core counts bytes and failed handshakes per listener (for the
-- streams it accepted); a stopped listener's counts are kept here.
local C_COUNTS = {"bytes_in", "bytes_out", "tls_handshake_failures"}

local function listener_counts(listener)
  return listener.stats and listener:stats() or {}
end

local function keep_counts(state, listener)
  local counts = listener_counts(listener)
  for _, k in ipairs(C_COUNTS) do
    state.closed_counts[k] = (state.closed_counts[k] or 0) + (counts[k] or 0)
  end
end

--- Stops accepting; open streams live on. Safe to call twice.
function TCPServer:stop()
  local state = state_of(self)
  state.stopped = true
  for _, listener in ipairs(state.listeners) do
    keep_counts(state, listener)
    listener:close()
  end
  state.listeners = {}
  for _, sock in ipairs(state.pending) do sock:close() end
  state.pending = {}
end

--- Number of connections whose handler is running.
function TCPServer:connection_count()
  return state_of(self).nstreams
end

--- Counters of this server since it was made: `connections_open`,
-- `connections_total` (accepted), `handler_errors` (handle_stream raised),
-- `bytes_in`, `bytes_out` (over the streams it accepted, after TLS:
-- application bytes) and `tls_handshake_failures`.
-- @treturn table
function TCPServer:stats()
  local state = state_of(self)
  local t = {
    connections_open = state.nstreams,
    connections_total = state.connections_total,
    handler_errors = state.handler_errors,
  }
  for _, k in ipairs(C_COUNTS) do t[k] = state.closed_counts[k] or 0 end
  for _, listener in ipairs(state.listeners) do
    local counts = listener_counts(listener)
    for _, k in ipairs(C_COUNTS) do t[k] = t[k] + (counts[k] or 0) end
  end
  return t
end

--- Graceful stop: stop accepting, give handlers `timeout` seconds (the
-- shutdown_timeout option by default), then close what is left. Calls
-- `done()` once no handler runs.
function TCPServer:shutdown(timeout, done)
  local state = state_of(self)
  timeout = timeout or state.options.shutdown_timeout
  self:stop()
  if state.nstreams == 0 then
    if done then done() end
    return
  end
  local timer = ioloop.current():call_later(timeout, function()
    log.info("shutdown_timeout (%g s) expired: closing %d connection%s", timeout,
             state.nstreams, state.nstreams == 1 and "" or "s")
    for _, stream in ipairs(core.streams_of(state.handler)) do stream:close() end
  end)
  state.drained[#state.drained + 1] = function()
    timer:cancel()
    if done then done() end
  end
end

--- The sum of every server's @{TCPServer:stats} in this process, but
-- those made with `in_stats = false` (luahost's own metrics endpoint).
function M.stats()
  local total = {connections_open = 0, connections_total = 0, handler_errors = 0}
  for _, k in ipairs(C_COUNTS) do total[k] = 0 end
  for server in pairs(servers) do
    if state_of(server).options.in_stats then
      for k, v in pairs(server:stats()) do total[k] = total[k] + v end
    end
  end
  return total
end

--- Graceful stop of every server in this process; `done()` when all are.
-- Logs what it waits for and when that is over. Returns the longest
-- shutdown_timeout it applies.
function M.shutdown_all(timeout, done)
  local open, longest, left, started = 0, 0, 1, ioloop.current():time()
  for server in pairs(servers) do
    open = open + server:connection_count()
    longest = math.max(longest, timeout or server._tcpserver.options.shutdown_timeout)
  end
  if open == 0 then
    log.info("Shutting down: no connections open")
  else
    log.info("Shutting down: waiting for %d connection%s (shutdown_timeout %g s)",
             open, open == 1 and "" or "s", longest)
  end
  local function one()
    left = left - 1
    if left > 0 then return end
    if open > 0 then
      log.info("Shut down: the last connection closed after %.1f s",
               ioloop.current():time() - started)
    end
    if done then done() end
  end
  for server in pairs(servers) do
    left = left + 1
    server:shutdown(timeout, one)
  end
  one()
  return longest
end

-- SIGINT and SIGTERM under luahost (IOLoop:stop_gracefully) drain every server.
ioloop.on_shutdown(function(done) return M.shutdown_all(nil, done) end)

M.TCPServer = TCPServer
return M
