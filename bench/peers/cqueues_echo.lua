-- Line echo with cqueues, after its own examples/echo.srv: a coroutine per
-- connection reading con:lines("*L") and writing each line back.
-- con:write flushes per the socket's (default) output buffering mode.
--   lua5.4 bench/peers/cqueues_echo.lua PORT
local cqueues = require "cqueues"
local socket = require "cqueues.socket"

local port = tonumber(arg[1])

local srv = socket.listen{host = "127.0.0.1", port = port, nodelay = true}
local loop = cqueues.new()

loop:wrap(function()
  for con in srv:clients{nodelay = true} do
    loop:wrap(function()
      con:setmode("b", "b")
      -- socket errors (a reset peer) raise: end this connection only
      pcall(function()
        for ln in con:lines("*L") do
          con:write(ln)
        end
      end)
      con:close()
    end)
  end
end)

assert(loop:loop())
