-- A WebSocket echo server (RFC 6455): the HTTP upgrade handshake, then
-- text and binary messages (fragmented or not) sent back as they came,
-- pings answered, and the closing handshake.
--   luahost examples/websocket.lua [--port 8765] [--host 127.0.0.1]
--     [--fragment-timeout 30] [--max-unfinished 67108864]
-- A message may be 1 MiB; an unfinished one waits at most
-- --fragment-timeout seconds for its next fragment (1008), and all of them
-- together hold at most --max-unfinished bytes (1013).
--   python3 -m websockets ws://127.0.0.1:8765/      (Debian: python3-websockets)
--
-- Everything is plain Lua 5.4: SHA-1 and base64 for the handshake,
-- string.pack/unpack for frame headers, integer XOR to unmask.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg, {
  port = 8765, host = "127.0.0.1",
  -- seconds an unfinished (fragmented) message may wait for its next
  -- frame; then the connection closes with 1008
  fragment_timeout = 30.0,
  -- bytes all connections' unfinished messages may hold together, as
  -- MAX_MESSAGE counts them; a fragment past it closes its connection
  -- with 1013 (try again later)
  max_unfinished = 64 * 1024 * 1024,
})

local MAX_MESSAGE = 1024 * 1024 -- a longer message closes with 1009
local FRAGMENT_COST = 64        -- what a fragment counts for beyond its bytes
local HANDSHAKE_TIMEOUT = 10    -- seconds for the upgrade request
local GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11" -- RFC 6455's constant

local pack, unpack = string.pack, string.unpack
local KEY = "^" .. ("[%w+/]"):rep(21) .. "[AQgw]==$" -- base64 of 16 bytes

-- ---- SHA-1 and base64, for Sec-WebSocket-Accept ------------------------------

local function rol(x, n) return ((x << n) | (x >> (32 - n))) & 0xffffffff end

local function sha1(msg)
  local h0, h1, h2, h3, h4 = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0
  -- pad: 0x80, zeros up to 56 mod 64, then the length in bits
  msg = msg .. "\128" .. ("\0"):rep((55 - #msg) % 64) .. pack(">I8", #msg * 8)
  local w = {}
  for chunk = 1, #msg, 64 do
    for i = 0, 15 do w[i] = unpack(">I4", msg, chunk + 4 * i) end
    for i = 16, 79 do w[i] = rol(w[i - 3] ~ w[i - 8] ~ w[i - 14] ~ w[i - 16], 1) end
    local a, b, c, d, e = h0, h1, h2, h3, h4
    for i = 0, 79 do
      local f, k
      if i < 20 then f, k = (b & c) | (~b & d), 0x5A827999
      elseif i < 40 then f, k = b ~ c ~ d, 0x6ED9EBA1
      elseif i < 60 then f, k = (b & c) | (b & d) | (c & d), 0x8F1BBCDC
      else f, k = b ~ c ~ d, 0xCA62C1D6 end
      a, b, c, d, e = (rol(a, 5) + f + e + k + w[i]) & 0xffffffff, a, rol(b, 30), c, d
    end
    h0, h1 = (h0 + a) & 0xffffffff, (h1 + b) & 0xffffffff
    h2, h3, h4 = (h2 + c) & 0xffffffff, (h3 + d) & 0xffffffff, (h4 + e) & 0xffffffff
  end
  return pack(">I4I4I4I4I4", h0, h1, h2, h3, h4)
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a << 16 | (b or 0) << 8 | (c or 0)
    for j = 0, 3 do
      local v = n >> (18 - 6 * j) & 63
      out[#out + 1] = B64:sub(v + 1, v + 1)
    end
    if not c then out[#out] = "=" end
    if not b then out[#out - 1] = "=" end
  end
  return table.concat(out)
end

-- ---- the handshake -----------------------------------------------------------

local function http_error(stream, status, extra)
  stream:write(("HTTP/1.1 %s\r\n%sContent-Length: 0\r\nConnection: close\r\n\r\n"):format(status, extra or ""))
end

-- Reads the upgrade request and answers it; true if the connection now
-- speaks WebSocket.
local function handshake(stream)
  local head = stream:read_until("\r\n\r\n", 8192)
  if not head then return false end
  local headers = {}
  for name, value in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do
    headers[name:lower()] = value
  end
  local function token(name, want) -- whether a comma-separated header holds `want`
    local list = (headers[name] or ""):lower():gsub("%s", "")
    return ("," .. list .. ","):find("," .. want .. ",", 1, true) ~= nil
  end
  if not head:match("^GET %S+ HTTP/1%.1\r\n") or not token("upgrade", "websocket") then
    http_error(stream, "426 Upgrade Required", "Upgrade: websocket\r\n")
    return false
  end
  local key = headers["sec-websocket-key"]
  if not token("connection", "upgrade") or not headers.host or not key or not key:match(KEY) then
    http_error(stream, "400 Bad Request")
    return false
  end
  if headers["sec-websocket-version"] ~= "13" then
    http_error(stream, "426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n")
    return false
  end
  stream:write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" ..
               "Sec-WebSocket-Accept: " .. base64(sha1(key .. GUID)) .. "\r\n\r\n")
  return true
end

-- ---- frames --------------------------------------------------------------------

local CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

-- XORs the payload with the 4-byte mask: 64 bytes (eight 64-bit
-- integers) per unpack and pack, then 4 at a time, then bytes.
local BLOCK = "<" .. ("i8"):rep(8)

local function unmask(data, key)
  local m4 = unpack("<I4", key)
  local m, out, n, i = m4 | m4 << 32, {}, #data, 1
  while i + 63 <= n do
    local a, b, c, d, e, f, g, h = unpack(BLOCK, data, i)
    out[#out + 1] = pack(BLOCK, a ~ m, b ~ m, c ~ m, d ~ m, e ~ m, f ~ m, g ~ m, h ~ m)
    i = i + 64
  end
  while i + 3 <= n do
    out[#out + 1] = pack("<I4", unpack("<I4", data, i) ~ m4)
    i = i + 4
  end
  for j = i, n do -- i - 1 is a multiple of 4: the mask starts over
    out[#out + 1] = string.char(data:byte(j) ~ key:byte(j - i + 1))
  end
  return table.concat(out)
end

-- A frame from the server: FIN set, never masked.
local function frame(opcode, payload)
  local n = #payload
  if n < 126 then return {pack("BB", 0x80 | opcode, n), payload} end
  if n < 65536 then return {pack(">BBI2", 0x80 | opcode, 126, n), payload} end
  return {pack(">BBI8", 0x80 | opcode, 127, n), payload}
end

-- Reads one frame: fin, opcode, payload; or nil and a close code to send
-- (nil when the client is gone), and the read's error.
local function read_frame(stream)
  local head, err = stream:read_bytes(2)
  if not head then return nil, nil, err end
  local b1, b2 = head:byte(1, 2)
  local fin, opcode, len = b1 & 0x80 ~= 0, b1 & 0x0f, b2 & 0x7f
  if b1 & 0x70 ~= 0 or b2 & 0x80 == 0 then return nil, 1002 end -- RSV bits; unmasked
  if opcode >= CLOSE and (not fin or len > 125) then return nil, 1002 end
  if len >= 126 then
    local ext
    ext, err = stream:read_bytes(len == 126 and 2 or 8)
    if not ext then return nil, nil, err end
    len = unpack(len == 126 and ">I2" or ">i8", ext)
    if len < 0 then return nil, 1002 end -- the top bit must be 0
  end
  if len > MAX_MESSAGE then return nil, 1009 end
  local rest
  rest, err = stream:read_bytes(4 + len) -- the mask, then the payload
  if not rest then return nil, nil, err end
  return fin, opcode, unmask(rest:sub(5), rest:sub(1, 4))
end

-- ---- the server ------------------------------------------------------------------

local WebSocketServer = tcpserver.TCPServer:extend()

--- Called for each whole message; `send(opcode, payload)` answers. This
-- one echoes: override it for anything else.
function WebSocketServer:on_message(opcode, message, send) -- luacheck: ignore 212
  send(opcode, message)
end

-- Whether a close frame may carry this code (RFC 6455 7.4: 1005, 1006
-- and 1015 are never sent; 1004 and 1016-2999 are reserved).
local function valid_close_code(code)
  return (code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014) or
         (code >= 3000 and code <= 4999)
end

-- The code to answer a close frame's payload with: its own, 1000 if it
-- has none, 1002 or 1007 if it is malformed.
local function close_reply(payload)
  if #payload == 0 then return 1000 end
  if #payload == 1 then return 1002 end
  local code = unpack(">I2", payload)
  if not valid_close_code(code) then return 1002 end
  if not utf8.len(payload, 3) then return 1007 end -- the reason must be UTF-8
  return code
end

-- What every connection's unfinished message holds, counted as `size`.
local unfinished = 0

function WebSocketServer:handle_stream(stream)
  stream:set_timeout(HANDSHAKE_TIMEOUT)
  if not handshake(stream) then return end
  stream:set_timeout(nil) -- a WebSocket may stay quiet for long...
  local function send(opcode, payload) return stream:write(frame(opcode, payload)) end
  local kind, parts, size = nil, {}, 0 -- the message being assembled
  local function forget() -- its parts leave the shared count
    unfinished, kind, parts, size = unfinished - size, nil, {}, 0
    stream:set_timeout(nil)
  end
  local _ <close> = setmetatable({}, {__close = forget})
  local deadline -- for the next fragment (pings in between do not count)
  while true do
    if kind then stream:set_timeout(math.max(deadline - ioloop.current():time(), 0.001)) end
    local fin, opcode, payload = read_frame(stream)
    if fin == nil then -- opcode holds the close code, if there is one to send
      if payload == "timeout" then opcode = 1008 end -- ...but not inside a message
      if opcode then send(CLOSE, pack(">I2", opcode)) end
      return
    end
    if opcode == PING then
      send(PONG, payload)
    elseif opcode == CLOSE then
      -- answer with the code; then the server closes the TCP connection
      send(CLOSE, pack(">I2", close_reply(payload)))
      return
    elseif opcode == PONG then -- luacheck: ignore 542
      -- unsolicited pongs are allowed; nothing to do
    elseif opcode == TEXT or opcode == BINARY or opcode == CONTINUATION then
      if (opcode == CONTINUATION) ~= (kind ~= nil) then -- a continuation needs a start, and vice versa
        send(CLOSE, pack(">I2", 1002))
        return
      end
      local cost = #payload + (kind and FRAGMENT_COST or 0) -- a continuation costs memory even when empty
      if size + cost > MAX_MESSAGE then
        send(CLOSE, pack(">I2", 1009))
        return
      end
      if fin and not kind then -- whole in one frame: nothing waits
        if opcode == TEXT and not utf8.len(payload) then
          send(CLOSE, pack(">I2", 1007)) -- text must be UTF-8
          return
        end
        self:on_message(opcode, payload, send)
      else
        if not fin and unfinished + cost > opts.max_unfinished then
          send(CLOSE, pack(">I2", 1013))
          return
        end
        deadline = ioloop.current():time() + opts.fragment_timeout
        kind = kind or opcode
        parts[#parts + 1], size, unfinished = payload, size + cost, unfinished + cost
        if fin then
          local message, k = table.concat(parts), kind
          forget()
          if k == TEXT and not utf8.len(message) then
            send(CLOSE, pack(">I2", 1007))
            return
          end
          self:on_message(k, message, send)
        end
      end
    else
      send(CLOSE, pack(">I2", 1002)) -- an unknown opcode
      return
    end
  end
end

local server = WebSocketServer()
local port = server:listen(opts.port, opts.host)
log.info("websocket server listening on ws://%s:%d/", opts.host, port)
ioloop.current():start()
