-- An HTTP/1.1 front for Redis: GET /KEY answers with the value Redis holds
-- for KEY (404 if none), PUT /KEY with a body stores it. The handler talks
-- to Redis through Debian's lua-redis, unchanged, over tcpserver.socket
-- (LuaSocket's API on the loop) with a connection pool, so a slow Redis
-- stalls the requests that wait for it and nothing else.
--   redis-server --port 6379 &        (Debian: redis-server)
--   luahost examples/redis_cache.lua [--port 8081] [--redis 127.0.0.1:6379]
--                                    [--pool-size 16] [--backlog 64]
--   curl -X PUT --data hello http://127.0.0.1:8081/greeting
--   curl http://127.0.0.1:8081/greeting
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"
local socket = require("tcpserver.socket").install() -- lua-redis's require "socket"

-- Debian ships lua-redis for Lua 5.1-5.3 only; its 5.3 copy runs on 5.4.
package.path = package.path .. ";/usr/share/lua/5.3/?.lua"
local redis = require "redis"

local opts = require("tcpserver.flags").parse(arg, {
  port = 8081, host = "127.0.0.1", redis = "127.0.0.1:6379", pool_size = 16, backlog = 64,
})
local REDIS_HOST, REDIS_PORT = opts.redis:match("^(.+):(%d+)$")
REDIS_PORT = math.tointeger(tonumber(REDIS_PORT))
if not REDIS_PORT then error("--redis must be HOST:PORT, got '" .. opts.redis .. "'", 0) end

local MAX_HEAD, MAX_BODY = 8192, 1024 * 1024

-- Runs fn(client) with a pooled Redis connection: at most --pool-size
-- open, up to --backlog requests waiting for one. Returns fn's result, or
-- nil and an error (Redis down, the pool full, a timeout).
local function with_redis(fn)
  local sock = socket.tcp()
  sock:settimeouts(2, 5, 5)
  local ok, err = sock:connect(REDIS_HOST, REDIS_PORT,
                               {pool_size = opts.pool_size, backlog = opts.backlog})
  if not ok then return nil, err end
  local client = redis.connect({socket = sock})
  local done, result = pcall(fn, client)
  if not done then
    sock:close() -- a failed exchange may leave a reply half read
    return nil, tostring(result)
  end
  sock:setkeepalive(60, opts.pool_size)
  return result or false
end

local function respond(stream, status, body, keep)
  stream:write(("HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s")
               :format(status, #body, keep and "" or "Connection: close\r\n", body))
end

local Cache = tcpserver.TCPServer:extend()

function Cache:handle_stream(stream)
  stream:settimeout(60)
  while true do
    local head = stream:read_until("\r\n\r\n", MAX_HEAD)
    if not head then return end
    local method, key = head:match("^(%u+) /([%w_%-%.:]+) HTTP/1%.1\r\n")
    local keep = not head:lower():find("\r\nconnection:%s*close")
    if not method then
      return respond(stream, "400 Bad Request", "bad request\n", false)
    elseif method == "GET" then
      local value, err = with_redis(function(c) return c:get(key) end)
      if value == nil then
        respond(stream, "503 Service Unavailable", "redis: " .. err .. "\n", keep)
      elseif value == false then
        respond(stream, "404 Not Found", "no such key\n", keep)
      else
        respond(stream, "200 OK", value, keep)
      end
    elseif method == "PUT" then
      local len = math.tointeger(tonumber(head:lower():match("\r\ncontent%-length:%s*(%d+)")))
      if not len or len > MAX_BODY then
        return respond(stream, "413 Content Too Large", "a body of at most 1 MiB\n", false)
      end
      local body = stream:read_bytes(len)
      if not body then return end
      local ok, err = with_redis(function(c) return c:set(key, body) end)
      if ok == nil then
        respond(stream, "503 Service Unavailable", "redis: " .. err .. "\n", keep)
      else
        respond(stream, "204 No Content", "", keep)
      end
    else
      respond(stream, "405 Method Not Allowed", "GET or PUT\n", keep)
    end
    if not keep then return end
  end
end

local server = Cache()
local port = server:listen(opts.port, opts.host)
log.info("redis cache listening on %s:%d, redis %s", opts.host, port, opts.redis)
ioloop.current():start()
