-- A tiny in-memory key-value server speaking the Redis protocol (RESP):
-- PING, ECHO, GET, SET (with EX/PX), DEL, EXISTS, INCR, EXPIRE, PEXPIRE,
-- TTL, PTTL, DBSIZE, FLUSHALL, CONFIG GET and QUIT: enough for redis-cli
-- and `redis-benchmark -t get,set,incr,ping` (any -P).
--   luahost examples/kv.lua [--port 6380] [--host 127.0.0.1]
--   redis-cli -p 6380 set counter 41; redis-cli -p 6380 incr counter
-- (`luahost examples/kv.lua PORT` works too.)
--
-- Requests are RESP arrays of bulk strings ("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
-- or inline commands ("PING\r\n", with quotes as Redis reads them). The
-- handler takes whatever the client has sent so far (read_bytes with
-- partial = true), parses every complete command in it (an incomplete one
-- is taken up where it stopped), and answers the whole batch with one
-- write of an array of replies: a pipelined batch costs one read and one
-- write, however long.
-- Values are stored already encoded as bulk replies ("$3\r\nbar\r\n"), so
-- GET answers with the stored string itself.
--
-- Keys with a time to live expire as in Redis: lazily, when a command
-- touches them, and by a sweep every 100 ms for those nobody asks for.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local find, sub, byte, upper = string.find, string.sub, string.byte, string.upper
local tonumber = tonumber

local READ_SIZE = 64 * 1024          -- what one partial read asks for
local MAX_LINE = 64 * 1024           -- longest inline command or header line
local MAX_ARGS = 1024 * 1024
local MAX_BULK = 512 * 1024 * 1024   -- as Redis's proto-max-bulk-len
-- Replies a batch queues before it writes them: write() then waits
-- while more than its high-water mark (1 MiB) is unsent, so a client that
-- pipelines GETs of a large value and reads slowly holds at most this,
-- plus one reply, plus that mark in the server (Redis instead drops a
-- client past client-output-buffer-limit).
local MAX_QUEUED = 1024 * 1024

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

-- Deadlines to come, soonest first: a binary heap of (time, key) in two
-- arrays. An entry whose key has since got another deadline, or none, is
-- dropped when it comes up. Walking all of `expires` each second stalled
-- every client for 180 ms at 500,000 keys.
local heap_at, heap_key, heap_n = {}, {}, 0

local function schedule(key, at)
  heap_n = heap_n + 1
  local i = heap_n
  while i > 1 and heap_at[i // 2] > at do
    heap_at[i], heap_key[i] = heap_at[i // 2], heap_key[i // 2]
    i = i // 2
  end
  heap_at[i], heap_key[i] = at, key
end

-- Takes the soonest entry off the heap: its time and key.
local function pop()
  local at, key = heap_at[1], heap_key[1]
  local last_at, last_key = heap_at[heap_n], heap_key[heap_n]
  heap_at[heap_n], heap_key[heap_n], heap_n = nil, nil, heap_n - 1
  local i = 1
  while 2 * i <= heap_n do
    local child = 2 * i
    if child < heap_n and heap_at[child + 1] < heap_at[child] then child = child + 1 end
    if heap_at[child] >= last_at then break end
    heap_at[i], heap_key[i] = heap_at[child], heap_key[child]
    i = child
  end
  if heap_n > 0 then heap_at[i], heap_key[i] = last_at, last_key end
  return at, key
end

-- Every 100 ms: at most 10,000 keys go (those past due and not asked
-- for since), so a mass expiry is spread out; the heap is rebuilt when
-- dropped entries make up most of it.
local function sweep()
  local now, removed = clock:time(), 0
  while heap_n > 0 and heap_at[1] <= now and removed < 10000 do
    local at, key = pop()
    if expires[key] == at and remove(key) then removed = removed + 1 end
  end
  if heap_n > 2 * count + 1024 then
    heap_at, heap_key, heap_n = {}, {}, 0
    for key, at in pairs(expires) do schedule(key, at) end
  end
end
ioloop.PeriodicCallback(sweep, 100):start()

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

-- An integer as Redis reads one (no sign but "-", no leading zero), or nil.
local function integer_arg(s)
  return (s == "0" or s:match("^%-?[1-9]%d*$")) and math.tointeger(tonumber(s))
end

-- Times to live in ms up to 2^52 (142,000 years): beyond that the
-- clock's float seconds lose milliseconds (Redis's own bound is 2^63).
local MAX_TTL_MS = 1 << 52

-- The deadline n seconds (scale 1) or milliseconds (scale 1000) from
-- now, or nil when n is out of range.
local function deadline(n, scale)
  local limit = MAX_TTL_MS * scale // 1000
  if n > limit or n < -limit then return nil end
  return clock:time() + n / scale
end

local NOT_INTEGER = err("value is not an integer or out of range")

function commands.SET(argv, argc)
  local ttl
  if argc == 5 then -- SET key value EX seconds | PX milliseconds
    local unit, n = upper(argv[4]), integer_arg(argv[5])
    local scale = unit == "EX" and 1 or unit == "PX" and 1000
    if not scale then return err("syntax error") end
    if not n then return NOT_INTEGER end
    ttl = n > 0 and deadline(n, scale)
    if not ttl then return err("invalid expire time in 'set' command") end
  elseif argc ~= 3 then
    return err("syntax error")
  end
  put(argv[2], bulk(argv[3]))
  if ttl then expires[argv[2]] = ttl; schedule(argv[2], ttl) end
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
    local at = deadline(n, scale)
    if not at then return err("invalid expire time in '" .. name .. "' command") end
    local key = argv[2]
    if lookup(key) == nil then return ZERO end
    if n <= 0 then
      remove(key)
    else
      expires[key] = at
      schedule(key, at)
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

function commands.DBSIZE(_, argc)
  if argc ~= 1 then return arity("dbsize") end
  return integer(count)
end

function commands.FLUSHALL(argv, argc) -- FLUSHALL [ASYNC | SYNC]
  if argc > 2 or (argc == 2 and upper(argv[2]) ~= "ASYNC" and upper(argv[2]) ~= "SYNC") then
    return err("syntax error")
  end
  store, expires, count = {}, {}, 0
  heap_at, heap_key, heap_n = {}, {}, 0
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

local ESCAPES = {n = "\n", r = "\r", t = "\t", b = "\b", a = "\a"}

-- Splits an inline line with quotes as Redis's sdssplitargs does: "..."
-- with \n \r \t \b \a \xHH and \<any>, '...' with \' only, a closing
-- quote followed by a space or the end. Returns argc, or nil if a quote
-- is unbalanced.
local function split_quoted(line, argv)
  local argc, i, n = 0, 1, #line
  while true do
    i = find(line, "[^ \t\r\n\0]", i) -- Redis skips isspace(); NUL ends a word
    if not i then return argc end
    local word, quote = {}, nil
    while true do
      local c = sub(line, i, i)
      if quote then
        if c == "" then return nil end -- unterminated
        if c == quote then -- closing: a space or the end must follow
          if i < n and not find(line, "^%s", i + 1) then return nil end
          i = i + 1
          break
        end
        local nxt = sub(line, i + 1, i + 1)
        local hex = quote == '"' and c == "\\" and line:match("^x(%x%x)", i + 1)
        if hex then
          c, i = string.char(tonumber(hex, 16)), i + 3
        elseif c == "\\" and (quote == '"' and nxt ~= "" or nxt == "'") then
          c, i = ESCAPES[nxt] or nxt, i + 1
        end
        word[#word + 1] = c
      elseif c == "" or find(c, "[ \t\r\n\0]") then
        break
      elseif c == '"' or c == "'" then
        quote = c
      else
        word[#word + 1] = c
      end
      i = i + 1
    end
    argc = argc + 1
    argv[argc] = table.concat(word)
  end
end

-- An inline command ("PING\r\n", "SET k v\n", 'SET k "a b"\r\n'): words
-- ended by LF with an optional CR, as Redis reads them.
local function parse_inline(buf, pos, argv)
  local eol = find(buf, "\n", pos, true)
  if (eol or #buf + 1) - pos > MAX_LINE then return PROTOCOL, "too big inline request" end
  if not eol then return nil, #buf - pos + 2, pos end
  local line, argc = sub(buf, pos, eol - 1), 0
  if find(line, "[\"']") then
    if byte(line, -1) == 13 then line = sub(line, 1, -2) end -- the line ends before CRLF
    argc = split_quoted(line, argv)
    if not argc then return PROTOCOL, "unbalanced quotes in request" end
  else
    for word in line:gmatch("%S+") do
      argc = argc + 1
      argv[argc] = word
    end
  end
  return argc, eol + 1
end

-- A length as Redis reads it: digits, no leading zero (but "0"), or nil.
local function length(digits)
  return (digits == "0" or byte(digits) ~= 48) and tonumber(digits) or nil
end

-- Parses one command starting at pos. Returns argc and the position after
-- it; or PROTOCOL and a message; or, when it is incomplete, nil, how many
-- bytes from the returned position it needs at least, and that position:
-- `partial` then holds how far it got (argc, and the arguments in argv
-- already), and the next call goes on from there. So a command of many
-- arguments arriving in many reads is parsed once, not again per read.
local function parse(buf, pos, argv, partial)
  local argc, first = partial.argc, partial.next
  if not argc then
    if byte(buf, pos) ~= 42 then return parse_inline(buf, pos, argv) end -- "*"
    local _, e, n = find(buf, "^%*(%-?%d+)\r\n", pos)
    if not e then
      local eol = find(buf, "\r\n", pos, true)
      if eol or #buf - pos >= MAX_LINE then return PROTOCOL, "invalid multibulk length" end
      return nil, #buf - pos + 2, pos
    end
    argc = byte(n) == 45 and 0 or length(n) -- "*-1", "*0": nothing (as Redis)
    if not argc or argc > MAX_ARGS then return PROTOCOL, "invalid multibulk length" end
    first, pos = 1, e + 1
  end
  for i = first, argc do
    local _, e, n = find(buf, "^%$(%d+)\r\n", pos)
    if not e then -- a whole line there that does not match is an error
      if find(buf, "\r\n", pos, true) or #buf - pos >= MAX_LINE then
        return PROTOCOL, "invalid bulk length"
      end
      partial.argc, partial.next = argc, i
      return nil, #buf - pos + 2, pos
    end
    local len = length(n)
    if not len or len > MAX_BULK then return PROTOCOL, "invalid bulk length" end
    local last = e + len
    if last + 2 > #buf then
      partial.argc, partial.next = argc, i
      return nil, last + 2 - pos + 1, pos
    end
    if byte(buf, last + 1) ~= 13 or byte(buf, last + 2) ~= 10 then
      return PROTOCOL, "bulk string without CRLF"
    end
    argv[i] = sub(buf, e + 1, last)
    pos = last + 3
  end
  partial.argc = nil
  return argc, pos
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
    elseif x > 48 and y and y >= 48 and y <= 57 and z == 13 and w == 10 then -- no leading 0
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

-- Writes replies[1..n] (one write, however many); false if the client
-- is gone, or if write() took none of them (the next reply must not go out
-- in their place).
local function send(stream, replies, n)
  if n == 0 then return true end
  if n == 1 then return stream:write(replies[1]) end
  for i = n + 1, #replies do replies[i] = nil end
  return stream:write(replies)
end

function KV:handle_stream(stream)
  local argv, replies = {}, {}
  local top = 0 -- arguments in argv
  local partial = {} -- how far parse got in an incomplete command
  local buf, pos = "", 1
  while true do
    -- everything the client has sent so far (at least one byte)
    local data = stream:read_bytes(READ_SIZE, true)
    if not data then return end
    if pos > #buf then buf = data else buf = sub(buf, pos) .. data end
    pos = 1
    local n, queued, quit = 0, 0, false
    while pos <= #buf do
      local argc, at, resume
      if not partial.argc then argc, at = parse_short(buf, pos, argv) end
      if argc == nil then argc, at, resume = parse(buf, pos, argv, partial) end
      if argc == nil then
        -- incomplete: a large value is read in one go, not piecemeal
        pos = resume
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
          local fn = commands[name] or commands[upper(name)]
          if fn then
            replies[n] = fn(argv, argc)
          elseif upper(name) == "QUIT" then
            replies[n], quit = OK, true
            break
          else
            replies[n] = err("unknown command '" .. sub(name, 1, 128):gsub("[\r\n]", " ") .. "'")
          end
          queued = queued + #replies[n]
          if queued > MAX_QUEUED then -- write these now; waits while the client lags
            if not send(stream, replies, n) then return end
            n, queued = 0, 0
          end
        end
        for i = argc + 1, top do argv[i] = nil end
        top = argc
      end
    end
    if not send(stream, replies, n) or quit then return end
  end
end

local opts = require("tcpserver.flags").parse(arg, {port = 6380, host = "127.0.0.1"}, {"port"})
local server = KV({max_buffer_size = MAX_BULK + 1024}) -- a value may be that large
local port = server:listen(opts.port, opts.host)
log.info("kv server listening on %s:%d", opts.host, port)
ioloop.current():start()
