-- Line echo with luv, written the way a luv user who cares about
-- throughput writes it: the read callback splits the chunk into lines as
-- luv_echo.lua does, but collects the replies and hands them to one
-- write call per chunk (uv.write accepts a table of strings and sends it
-- with one writev) instead of one write per line.
--   lua5.4 bench/peers/luv_batch_echo.lua PORT
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
    local out, n, start = {}, 0, 1
    while true do
      local nl = data:find("\n", start, true)
      if not nl then break end
      n = n + 1
      out[n] = data:sub(start, nl)
      start = nl + 1
    end
    pending = data:sub(start)
    if n > 0 then client:write(out) end
  end)
end))

uv.run()
