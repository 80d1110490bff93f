-- The kv server written the straightforward way, for the benchmark: one
-- read_until per RESP header line and one read_bytes per argument, one
-- write per reply (what issue 12 asks the per-call costs to show in).
--   luahost bench/kv_plain.lua PORT
-- GET, SET, PING and CONFIG (redis-benchmark asks for it); no TTLs.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"

local tonumber, sub = tonumber, string.sub
local OK, NIL, PONG, EMPTY = "+OK\r\n", "$-1\r\n", "+PONG\r\n", "*0\r\n"
local store = {}

local KV = tcpserver.TCPServer:extend()

function KV:handle_stream(stream)
  local argv = {}
  while true do
    local line = stream:read_until("\r\n", 64 * 1024)
    if not line then return end
    local argc = tonumber(sub(line, 2, -3))
    if sub(line, 1, 1) ~= "*" or not argc then -- inline PING
      stream:write(PONG)
    else
      for i = 1, argc do
        local header = stream:read_until("\r\n", 64 * 1024)
        local len = header and tonumber(sub(header, 2, -3))
        local arg = len and stream:read_bytes(len + 2)
        if not arg then return end
        argv[i] = sub(arg, 1, -3)
      end
      local cmd = argv[1]
      if cmd == "GET" then
        local v = store[argv[2]]
        stream:write(v and "$" .. #v .. "\r\n" .. v .. "\r\n" or NIL)
      elseif cmd == "SET" then
        store[argv[2]] = argv[3]
        stream:write(OK)
      elseif cmd == "PING" then
        stream:write(PONG)
      elseif cmd == "CONFIG" then
        stream:write(EMPTY)
      else
        stream:write("-ERR unknown command\r\n")
      end
    end
  end
end

KV():listen(tonumber(arg[1]), "127.0.0.1")
ioloop.current():start()
