-- Line echo with luv (libuv for Lua), in the style of its README and
-- examples: a listen callback, read_start with a callback per chunk that
-- splits complete lines off and writes each back.
--   lua5.4 bench/peers/luv_echo.lua PORT
local uv = require "luv"

local port = tonumber(arg[1])

-- libuv leaves SIGPIPE alone: a server must ignore it, or the first write
-- to a peer that has gone kills the process.
local sigpipe = uv.new_signal()
sigpipe:start("sigpipe", function() end)
uv.unref(sigpipe)

local server = uv.new_tcp()
assert(server:bind("127.0.0.1", port))
assert(server:listen(128, function(err)
  assert(not err, err)
  local client = uv.new_tcp()
  server:accept(client)
  client:nodelay(true)
  local pending = ""
  client:read_start(function(rerr, chunk)
    if rerr or not chunk then
      client:close()
      return
    end
    local data = pending .. chunk
    local start = 1
    while true do
      local nl = data:find("\n", start, true)
      if not nl then break end
      client:write(data:sub(start, nl))
      start = nl + 1
    end
    pending = data:sub(start)
  end)
end))

uv.run()
