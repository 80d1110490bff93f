--- Connection pools (OpenResty's model), per process, for tcpclient
-- streams and tcpserver.socket alike. A pool is named by "host:port" or
-- the `pool` option. set_keepalive puts a clean stream back (at most
-- pool_size are kept idle; an idle one closes at its idle timeout, or
-- when its peer closes it); a connect takes an idle one first. With
-- `backlog`, at most pool_size connections of the pool are open at once:
-- up to `backlog` more connects wait in order, and one past that fails at
-- once with nil, "too many waiting connect operations".
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"

local M = {}

local DEFAULT_SIZE = 30 -- as OpenResty's lua_socket_pool_size

local pools = {}
local of_stream = setmetatable({}, {__mode = "k"}) -- stream -> {pool =, reused =, guard =}

local function get_pool(name, size)
  local p = pools[name]
  if not p then
    p = {name = name, idle = {}, size = size or DEFAULT_SIZE}
    pools[name] = p
  end
  return p
end

-- A stream fit to hand out: open, and nothing unread (a reply that came
-- late, or the peer's end).
local function usable(stream)
  return not stream:closed() and stream:buffer_sizes() == 0
end

local function check_size(v, what)
  if v ~= nil and (math.type(v) ~= "integer" or v < 1) then
    error(what .. " must be a positive integer", 3)
  end
end

--- take(name, opts) -> an idle stream of the pool; or nil, nil [, release]
-- when the caller must connect (release: gives the pool's permit back,
-- with backlog); or nil, err when it may not ("too many waiting connect
-- operations", or "timeout" waiting for a permit or an idle stream).
function M.take(name, opts)
  check_size(opts.pool_size, "pool_size")
  if opts.backlog ~= nil and (math.type(opts.backlog) ~= "integer" or opts.backlog < 0) then
    error("backlog must be an integer >= 0", 2)
  end
  local p = get_pool(name, opts.pool_size)
  local deadline = opts.timeout and ioloop.current():time() + opts.timeout
  while true do
    while #p.idle > 0 do
      local e = table.remove(p.idle) -- the most recently used first
      e.timer:cancel()
      if usable(e.stream) then
        local info = of_stream[e.stream]
        info.reused = info.reused + 1
        return e.stream
      end
      e.stream:close()
    end
    if not opts.backlog then return nil end
    p.open = p.open or 0
    if p.open < p.size then -- a permit: the caller connects
      p.open = p.open + 1
      local released = false
      return nil, nil, function()
        if released then return end
        released = true
        p.open = p.open - 1
        if p.changed then p.changed:notify(1) end
      end
    end
    p.changed = p.changed or locks.Condition()
    if (p.waiting or 0) >= opts.backlog then
      return nil, "too many waiting connect operations"
    end
    local left = deadline and deadline - ioloop.current():time()
    if left and left <= 0 then return nil, "timeout" end
    p.waiting = (p.waiting or 0) + 1
    local ok = p.changed:wait(left) -- a permit or an idle connection came
    p.waiting = p.waiting - 1
    if not ok then return nil, "timeout" end
  end
end

--- Records a new stream of pool `name` (with the release take gave).
function M.track(stream, name, release)
  of_stream[stream] = {pool = name, reused = 0}
  if release then stream:set_close_callback(release) end -- the permit goes with it
end

--- How many times the stream was handed out again from its pool.
function M.reused_times(stream)
  local info = of_stream[stream]
  return info and info.reused or 0
end

--- Puts the stream back into its pool (or the pool named by host:port
-- at connect). Returns true, or nil, err when it is not fit to keep (it
-- is closed then).
function M.keepalive(stream, name, idle_timeout, pool_size)
  if idle_timeout ~= nil and (type(idle_timeout) ~= "number" or idle_timeout < 0) then
    error("set_keepalive: idle_timeout must be a number of seconds >= 0 (0: no limit)", 3)
  end
  check_size(pool_size, "set_keepalive: pool_size")
  local info = of_stream[stream]
  name = info and info.pool or name
  if not name then
    stream:close()
    return nil, "no pool: the stream was not made by connect"
  end
  if stream:closed() then return nil, "closed" end
  if not usable(stream) then
    stream:close()
    return nil, "unread data"
  end
  local p = get_pool(name, pool_size)
  if pool_size then p.size = pool_size end
  if not stream:flush() then
    stream:close()
    return nil, "closed"
  end
  if #p.idle >= p.size then -- a full pool keeps no more
    stream:close()
    return true
  end
  local e = {stream = stream}
  local timeout = idle_timeout ~= 0 and (idle_timeout or 60) or nil
  e.timer = {cancel = function() end}
  if timeout then
    e.timer = ioloop.current():call_later(timeout, function()
      for i, x in ipairs(p.idle) do
        if x == e then
          table.remove(p.idle, i)
          break
        end
      end
      stream:close()
    end)
  end
  p.idle[#p.idle + 1] = e
  if p.changed then p.changed:notify(1) end -- a connect waiting in the backlog takes it
  return true
end

--- The pools' state, for specs and stats: {name = {idle = n, size = n}}.
function M.stats()
  local out = {}
  for name, p in pairs(pools) do out[name] = {idle = #p.idle, size = p.size} end
  return out
end

return M
