-- bench/socket_face.lua -- what tcpserver.socket's LuaSocket face adds to a
-- round trip over a raw IOStream: a client task sends a 64-byte line to a
-- line echo server in the same process and reads it back, N times, through
-- `sock:send` + `sock:receive()` and through `stream:write` +
-- `stream:read_until("\n")`, REPEATS times interleaved. CPU (os.clock, the
-- whole process: server, client and loop) per round trip, min / median / max.
--
--   build/luahost bench/socket_face.lua
--
-- Environment: FACE_N (20000), FACE_REPEATS (5).
local ioloop = require "tcpserver.ioloop"
local socket = require "tcpserver.socket"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"

local N = math.tointeger(tonumber(os.getenv("FACE_N") or "")) or 20000
local REPEATS = math.tointeger(tonumber(os.getenv("FACE_REPEATS") or "")) or 5
local LINE = ("x"):rep(63) .. "\n"

local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    stream:write(line)
  end
end})

ioloop.current():run_sync(function()
  local server = Echo()
  local port = server:listen(0, "127.0.0.1")
  local stream = assert(tcpclient.connect("127.0.0.1", port))
  local sock = assert(socket.connect("127.0.0.1", port))
  local ops = {
    iostream = function()
      for _ = 1, N do
        stream:write(LINE)
        stream:read_until("\n")
      end
    end,
    socket = function()
      for _ = 1, N do
        sock:send(LINE)
        sock:receive()
      end
    end,
  }
  local times = {iostream = {}, socket = {}}
  for _ = 1, REPEATS do
    for _, name in ipairs {"iostream", "socket"} do
      local t0 = os.clock()
      ops[name]()
      local t = times[name]
      t[#t + 1] = (os.clock() - t0) / N * 1e6
    end
  end
  local med = {}
  for _, name in ipairs {"iostream", "socket"} do
    local t = times[name]
    table.sort(t)
    med[name] = t[(#t + 1) // 2]
    print(("face op=%s us_min=%.2f us_med=%.2f us_max=%.2f"):format(name, t[1], med[name], t[#t]))
  end
  print(("face ratio_med=%.3f"):format(med.socket / med.iostream))
  stream:close()
  sock:close()
  server:stop()
end, 600)
