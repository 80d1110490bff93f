-- A tiny in-memory key-value server speaking the Redis protocol (RESP):
-- PING, ECHO, GET, SET (with EX/PX), DEL, EXISTS, INCR, EXPIRE, PEXPIRE,
-- TTL, PTTL, DBSIZE, FLUSHALL, CONFIG GET and QUIT: enough for redis-cli
-- and `redis-benchmark -t get,set,incr,ping` (any -P).
--   luahost examples/kv.lua [--port 6380] [--host 127.0.0.1]
--   redis-cli -p 6380 set counter 41; redis-cli -p 6380 incr counter
-- (`luahost examples/kv.lua PORT` works too.)
--
-- Requests are RESP arrays of bulk strings ("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
-- or inline commands ("PING\r\n"). The handler takes whatever the client
-- has sent so far (read_bytes with partial = true), parses every complete
-- command in it, and answers the whole batch with one write of an array of
-- replies: a pipelined batch costs one read and one write, however long.
-- Values are stored already encoded as bulk replies ("$3\r\nbar\r\n"), so
-- GET answers with the stored string itself.
--
-- Keys with a time to live expire as in Redis: lazily, when a command
-- touches them, and by a sweep each second for those nobody asks for.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local find, sub, byte, upper = string.find, string.sub, string.byte, string.upper
local tonumber = tonumber

local READ_SIZE = 64 * 1024          -- what one partial read asks for
local MAX_LINE = 64 * 1024           -- longest inline command or header line
local MAX_ARGS = 1024 * 1024
local MAX_BULK = 512 * 1024 * 1024   -- as Redis's proto-max-bulk-len

local OK, PONG, NIL = "+OK\r\n", "+PONG\r\n", "$-1\r\n"
local ZERO, ONE = ":0\r\n", ":1\r\n"

local store, count = {}, 0
local expires = {} -- key -> when it expires (the loop's clock, seconds)
local clock = ioloop.current()

-- Forgets a key and its time to live.
local function remove(key)
  if store[key] ~= nil then
    store[key], expires[key] = nil, nil
    count = count - 1
    return true
  end
  return false
end

-- The key's stored value, unless it has expired (then it goes now).
local function lookup(key)
  local at = expires[key]
  if at and at <= clock:time() then remove(key) end
  return store[key]
end

local function sweep()
  local now = clock:time()
  for key, at in pairs(expires) do
    if at <= now then remove(key) end -- removing while iterating is fine in Lua
  end
end
ioloop.PeriodicCallback(sweep, 1000):start()

local function integer(n)
  if n == 0 then return ZERO elseif n == 1 then return ONE end
  return ":" .. n .. "\r\n"
end

local HEADER = {} -- "$<n>\r\n" made once for short values: no number formatting per SET
for n = 0, 127 do HEADER[n] = "$" .. n .. "\r\n" end

local function bulk(s)
  local n = #s
  return (HEADER[n] or "$" .. n .. "\r\n") .. s .. "\r\n"
end

local function err(msg)
  return "-ERR " .. msg .. "\r\n"
end

local function arity(name)
  return err("wrong number of arguments for '" .. name:lower() .. "' command")
end

-- Command handlers: (argv, argc) -> reply.
local commands = {}

function commands.PING(argv, argc)
  if argc == 1 then return PONG end
  if argc == 2 then return bulk(argv[2]) end
  return arity("ping")
end

function commands.ECHO(argv, argc)
  if argc ~= 2 then return arity("echo") end
  return bulk(argv[2])
end

function commands.GET(argv, argc)
  if argc ~= 2 then return arity("get") end
  local key = argv[2]
  if expires[key] == nil then return store[key] or NIL end -- lookup's common case
  return lookup(key) or NIL
end

-- Stores an encoded value; a plain SET clears the key's time to live.
local function put(key, encoded)
  if lookup(key) == nil then count = count + 1 end
  store[key], expires[key] = encoded, nil
end

-- Seconds (or milliseconds) as an integer, or nil.
local function integer_arg(s)
  return s:match("^%-?%d+$") and math.tointeger(tonumber(s))
end

local NOT_INTEGER = err("value is not an integer or out of range")

function commands.SET(argv, argc)
  local ttl
  if argc == 5 then -- SET key value EX seconds | PX milliseconds
    local unit, n = upper(argv[4]), integer_arg(argv[5])
    if not n then return NOT_INTEGER end
    if n <= 0 then return err("invalid expire time in 'set' command") end
    ttl = unit == "EX" and n or unit == "PX" and n / 1000
    if not ttl then return err("syntax error") end
  elseif argc ~= 3 then
    return err("syntax error")
  end
  put(argv[2], bulk(argv[3]))
  if ttl then expires[argv[2]] = clock:time() + ttl end
  return OK
end

function commands.INCR(argv, argc)
  if argc ~= 2 then return arity("incr") end
  local key, value = argv[2], 0
  local stored = lookup(key)
  if stored then
    value = integer_arg(stored:match("\r\n(.*)\r\n$"))
    if not value or value == math.maxinteger then return NOT_INTEGER end
  end
  value = value + 1
  local ttl = expires[key] -- INCR keeps the time to live
  put(key, bulk(tostring(value)))
  expires[key] = ttl
  return integer(value)
end

-- EXPIRE key seconds / PEXPIRE key milliseconds: 1 if set, 0 if no key;
-- a time not in the future deletes the key, as in Redis.
local function expire(name, scale)
  return function(argv, argc)
    if argc ~= 3 then return arity(name) end
    local n = integer_arg(argv[3])
    if not n then return NOT_INTEGER end
    local key = argv[2]
    if lookup(key) == nil then return ZERO end
    if n <= 0 then
      remove(key)
    else
      expires[key] = clock:time() + n / scale
    end
    return ONE
  end
end
commands.EXPIRE = expire("expire", 1)
commands.PEXPIRE = expire("pexpire", 1000)

-- TTL / PTTL: what is left (rounded), -1 without a time to live, -2 without the key.
local function ttl(name, scale)
  return function(argv, argc)
    if argc ~= 2 then return arity(name) end
    local key = argv[2]
    if lookup(key) == nil then return integer(-2) end
    local at = expires[key]
    if not at then return integer(-1) end
    return integer(math.floor((at - clock:time()) * scale + 0.5))
  end
end
commands.TTL = ttl("ttl", 1)
commands.PTTL = ttl("pttl", 1000)

function commands.DEL(argv, argc)
  if argc < 2 then return arity("del") end
  local n = 0
  for i = 2, argc do
    if lookup(argv[i]) ~= nil and remove(argv[i]) then n = n + 1 end
  end
  return integer(n)
end

function commands.EXISTS(argv, argc)
  if argc < 2 then return arity("exists") end
  local n = 0
  for i = 2, argc do
    if lookup(argv[i]) ~= nil then n = n + 1 end
  end
  return integer(n)
end

function commands.DBSIZE()
  return integer(count)
end

function commands.FLUSHALL()
  store, expires, count = {}, {}, 0
  return OK
end

-- redis-benchmark asks for the server's save/appendonly settings first.
local CONFIG = {save = "", appendonly = "no"}

function commands.CONFIG(argv, argc)
  local key = argc == 3 and upper(argv[2]) == "GET" and argv[3]:lower()
  if not key or not CONFIG[key] then return "*0\r\n" end
  return "*2\r\n" .. bulk(key) .. bulk(CONFIG[key])
end

-- ---- the parser: one command from buf at pos --------------------------------

local PROTOCOL = {}  -- a unique value: "protocol error" (reply, then close)

-- Parses one command starting at pos. Returns argc and the position after
-- it; or nil and how many bytes from pos the command needs at least (when
-- it is incomplete); or PROTOCOL and a message. Fills argv[1..argc].
-- Anchored patterns ("^" at the init position) check a header line and
-- capture its number in one call; the CRLF after a bulk string is checked
-- by the next argument's pattern, or at the end.
local function parse(buf, pos, argv)
  local _, e, n = find(buf, "^%*(%d+)\r\n", pos)
  if not e then
    local eol = find(buf, "\r\n", pos, true)
    if not eol then
      if #buf - pos >= MAX_LINE then return PROTOCOL, "too big inline request" end
      return nil, #buf - pos + 2
    end
    if byte(buf, pos) == 42 then return PROTOCOL, "invalid multibulk length" end
    local argc = 0 -- an inline command
    for word in sub(buf, pos, eol - 1):gmatch("%S+") do
      argc = argc + 1
      argv[argc] = word
    end
    return argc, eol + 2
  end
  local argc = tonumber(n)
  if argc > MAX_ARGS then return PROTOCOL, "invalid multibulk length" end
  local at, header = e + 1, "^%$(%d+)\r\n"
  for i = 1, argc do
    _, e, n = find(buf, header, at)
    if not e then -- a whole line there that does not match is an error
      local eol = find(buf, "\r\n", i > 1 and at + 2 or at, true)
      if eol or #buf - at >= MAX_LINE then return PROTOCOL, "invalid bulk length" end
      return nil, #buf - pos + 2
    end
    local len = tonumber(n)
    if len > MAX_BULK then return PROTOCOL, "invalid bulk length" end
    local last = e + len
    if last + 2 > #buf then return nil, last + 2 - pos + 1 end
    argv[i] = sub(buf, e + 1, last)
    at, header = last + 1, "^\r\n%$(%d+)\r\n"
  end
  if argc > 0 then
    if sub(buf, at, at + 1) ~= "\r\n" then return PROTOCOL, "bulk string without CRLF" end
    at = at + 2
  end
  return argc, at
end

-- The common case, in a few calls: "*<1-9>\r\n" then "$<0-99>\r\n<bytes>\r\n"
-- per argument, all there. Reads bytes (several per string.byte call) rather
-- than matching patterns, and takes lengths from the digits: half the cost
-- of parse. Returns what parse would, or nil for anything else (a longer
-- length, an incomplete or bad command), which parse then handles.
local function parse_short(buf, pos, argv)
  -- "*N\r\n" and the first argument's header in one call
  local star, n, cr, lf, dollar, x, y, z, w = byte(buf, pos, pos + 8)
  if star ~= 42 or cr ~= 13 or lf ~= 10 or not n or n < 49 or n > 57 then return nil end
  local argc, at, size = n - 48, pos + 4, #buf
  for i = 1, argc do
    if i > 1 then -- the CRLF ending the last argument, then this header
      local r, l
      r, l, dollar, x, y, z, w = byte(buf, at - 2, at + 4)
      if r ~= 13 or l ~= 10 then return nil end
    end
    if dollar ~= 36 or not x or x < 48 or x > 57 then return nil end
    local len, first
    if y == 13 and z == 10 then
      len, first = x - 48, at + 4
    elseif y and y >= 48 and y <= 57 and z == 13 and w == 10 then
      len, first = (x - 48) * 10 + y - 48, at + 5
    else
      return nil
    end
    local last = first + len - 1
    if last + 2 > size then return nil end
    argv[i] = sub(buf, first, last)
    at = last + 3
  end
  local r, l = byte(buf, at - 2, at - 1)
  if r ~= 13 or l ~= 10 then return nil end
  return argc, at
end

-- ---- the server ---------------------------------------------------------------

local KV = tcpserver.TCPServer:extend()

function KV:handle_stream(stream)
  local argv, replies = {}, {}
  local top = 0 -- arguments in argv
  local buf, pos = "", 1
  while true do
    -- everything the client has sent so far (at least one byte)
    local data = stream:read_bytes(READ_SIZE, true)
    if not data then return end
    if pos > #buf then buf = data else buf = sub(buf, pos) .. data end
    pos = 1
    local n, quit = 0, false
    while pos <= #buf do
      local argc, at = parse_short(buf, pos, argv)
      if argc == nil then argc, at = parse(buf, pos, argv) end
      if argc == nil then
        -- incomplete: a large value is read in one go, not piecemeal
        local need = at - (#buf - pos + 1)
        if n == 0 and need > READ_SIZE then
          local more = stream:read_bytes(need)
          if not more then return end
          buf = sub(buf, pos) .. more
          pos = 1
        else
          break
        end
      elseif argc == PROTOCOL then
        n = n + 1
        replies[n] = "-ERR Protocol error: " .. at .. "\r\n"
        quit = true
        break
      else
        pos = at
        if argc > 0 then
          n = n + 1
          local name = argv[1]
          if name == "QUIT" or name == "quit" then
            replies[n], quit = OK, true
            break
          end
          local fn = commands[name] or commands[upper(name)]
          if fn then
            replies[n] = fn(argv, argc)
          else
            replies[n] = err("unknown command '" .. name .. "'")
          end
        end
        for i = argc + 1, top do argv[i] = nil end
        top = argc
      end
    end
    if n == 1 then
      stream:write(replies[1])
    elseif n > 1 then
      for i = n + 1, #replies do replies[i] = nil end
      stream:write(replies)
    end
    if quit then return end
  end
end

local opts = require("tcpserver.host").options(arg, {port = 6380, host = "127.0.0.1"}, {"port"})
local server = KV()
local port = server:listen(opts.port, opts.host)
log.info("kv server listening on %s:%d", opts.host, port)
ioloop.current():start()
