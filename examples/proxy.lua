-- A TCP proxy: every connection is piped both ways to an upstream server.
--   luahost examples/proxy.lua [--port 8000] [--host 127.0.0.1] [--upstream 127.0.0.1:8888]
--   (with `luahost examples/echo.lua` upstream: nc 127.0.0.1 8000)
-- The upstream is HOST:PORT, [IPv6]:PORT, or unix:/path for a unix socket.
--
-- Backpressure comes for free from the stream API: each direction is a
-- loop that reads what has arrived and writes it on. write() waits while
-- the destination's buffer is over its high-water mark (1 MiB), and while
-- the loop waits it does not read, so the source's buffer fills up, the
-- core stops reading that socket, and TCP tells the sender to slow down.
-- Memory per connection stays bounded however fast one side sends.
--
-- Each direction is a task of its own, and each stream is written by one
-- of them only; the handler waits for the first to end (ioloop.wait_any)
-- and stops the other (Task:kill), instead of polling both.
--
-- A half-close passes through: when one side ends its sending (`nc -N`,
-- an upload ended by EOF), the other side reads the end, and its answer
-- still comes back (set_half_open and shutdown("send")).
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"
local tcpclient = require "tcpserver.tcpclient"

local opts = require("tcpserver.flags").parse(arg,
  {port = 8000, host = "127.0.0.1", upstream = "127.0.0.1:8888", connect_timeout = 5})

-- tcpclient.connect's arguments: ("unix:/path", nil) or (host, port).
local UP_HOST, UP_PORT = opts.upstream, nil
if not UP_HOST:match("^unix:") then
  local host, port = UP_HOST:match("^%[?([^%]]+)%]?:(%d+)$")
  UP_HOST, UP_PORT = host, math.tointeger(tonumber(port))
  if not UP_PORT then error("--upstream must be HOST:PORT or unix:/path, got '" .. opts.upstream .. "'", 0) end
end

local CHUNK = 64 * 1024

-- Copies src to dst until src ends, then passes the end on: dst's
-- sending half closes, and the other direction goes on. Returns "end",
-- or why it stopped early ("closed", "timeout", ...).
local function pipe(src, dst)
  while true do
    local data, err = src:read_bytes(CHUNK, true) -- whatever has arrived, 1..CHUNK bytes
    if not data then
      if err ~= "closed" then return err end
      dst:shutdown("send") -- the peer reads the end; the answer may still come back
      return "end"
    end
    if not dst:write(data) then return "closed" end -- waits while dst is over its high-water mark
  end
end

local Proxy = tcpserver.TCPServer:extend()

function Proxy:handle_stream(client, address)
  local upstream, err = tcpclient.connect(UP_HOST, UP_PORT, {timeout = opts.connect_timeout})
  if not upstream then
    log.warning("%s: cannot reach %s: %s", address, opts.upstream, err)
    return -- the server closes the client's stream
  end
  -- A side's end is a half-close: the streams stay open for the answer.
  client:set_half_open(true)
  upstream:set_half_open(true)
  local loop = ioloop.current()
  local up = loop:spawn(pipe, client, upstream)
  local down = loop:spawn(pipe, upstream, client)
  -- The first direction to end: if it ended cleanly (its source sent its
  -- end), the other goes on until its own end; if it failed (a reset, a
  -- write to a closed peer), the other is stopped where it waits (kill
  -- cancels its read or write cleanly). Then both streams close (close()
  -- still delivers what was written, for up to 10 s).
  local first = ioloop.wait_any({up, down})
  local other = first == up and down or up
  local _, why = first:join()
  if why == "end" then
    other:join()
  else
    other:kill()
  end
  upstream:close()
end

local server = Proxy()
local port = server:listen(opts.port, opts.host)
log.info("proxy listening on %s:%d, upstream %s", opts.host, port, opts.upstream)
ioloop.current():start()
