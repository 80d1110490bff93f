-- Chat server: pick a nickname, then every line you send goes to everyone
-- else in the room.
--   luahost examples/chat.lua [--port 8890] [--host 127.0.0.1]
--                             [--max-queue LINES] [--slow drop|drop-oldest]
-- Try it with two terminals running `nc 127.0.0.1 8890`.
--
-- Commands: /nick NAME (rename), /who (who is here), /quit.
--
-- The pattern to copy: a broadcast never writes to a stream. The room is a
-- tcpserver.broadcast topic; each member subscribes with a bounded queue
-- and has exactly one writer task, the only code that calls write() on its
-- stream. Publishing queues a line for every member and returns at once,
-- so one slow reader cannot stall the sender, and no stream ever sees two
-- writes at the same time. A member whose queue holds --max-queue lines (it
-- stopped reading while the room kept talking) meets the --slow policy:
-- "drop" (the default) closes its stream and everyone else goes on;
-- "drop-oldest" keeps it, and its oldest lines make room. A member costs at
-- most the stream's write buffer (write() waits past 1 MiB) plus
-- --max-queue lines.
local broadcast = require "tcpserver.broadcast"
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg,
  {port = 8890, host = "127.0.0.1", max_queue = 256, slow = "drop"})
if opts.slow ~= "drop" and opts.slow ~= "drop-oldest" then
  io.stderr:write("chat.lua: --slow must be drop or drop-oldest\n")
  os.exit(2)
end
local POLICY = opts.slow == "drop" and "drop" or "drop_oldest"

local MAX_LINE = 4096 -- longer lines close the connection ("too large")

local room = {}                   -- nickname -> Member
local topic = broadcast.Topic()   -- every member's subscription

-- ---- a member: its stream, its subscription and its writer task -------------

local Member = {}
Member.__index = Member

local leave

--- A newcomer who took `nick`: from now on only its writer task writes to
-- its stream (before, while it chose a nickname, its handler did).
function Member.join(stream, nick)
  local self = setmetatable({stream = stream, nick = nick}, Member)
  self.sub = topic:subscribe(opts.max_queue, POLICY, function() self:drop("too slow") end)
  room[nick] = self
  self.writer = ioloop.current():spawn(function()
    -- write() returns at once unless the stream's buffer is over its
    -- high-water mark (the member reads slowly); then this task waits and
    -- lines pile up in its queue, up to --max-queue
    for line in self.sub:messages() do
      if not stream:write(line) then break end -- closed
    end
  end)
  return self
end

--- A line for this member only (/who): through its own queue, so that it
-- comes in order with what the room says.
function Member:send(line)
  self.sub:send(line)
end

--- Policy "drop": close its stream. close() first tries to hand over what
-- is already written (for up to 10 s); then the member's reader and
-- writer see "closed" and its handler ends.
function Member:drop(reason)
  if self.dropped then return end
  self.dropped = reason
  log.warning("dropping %s: %s", self.nick, reason)
  self.stream:close()
  leave(self, " (dropped: too slow)")
end

--- Lets the writer send what is queued, then waits for it to end.
function Member:finish()
  self.sub:close()
  self.writer:join()
end

-- Sends a line to everyone in the room but `except`.
local function say(line, except)
  topic:publish(line, except and except.sub)
end

function leave(member, why)
  if room[member.nick] ~= member then return end -- already gone
  room[member.nick] = nil
  member.sub:close()
  say(("* %s left%s\n"):format(member.nick, why or ""))
end

-- ---- the server -------------------------------------------------------------

local function valid_nick(nick)
  return nick and nick:match("^[%w_%-]+$") and #nick <= 20
end

local ChatServer = tcpserver.TCPServer:extend()

-- Reads one line without its "\n" (and "\r", for telnet); nil at the end.
local function read_line(stream)
  local line = stream:read_until("\n", MAX_LINE)
  return line and line:gsub("\r?\n$", "")
end

-- Asks for a nickname until a free one comes; nil if the client leaves.
local function choose_nick(stream)
  stream:write("Welcome! Your nickname?\n")
  while true do
    local nick = read_line(stream)
    if not nick then return nil end
    if not valid_nick(nick) then
      stream:write("Letters, digits, _ and - only (at most 20). Your nickname?\n")
    elseif room[nick] then
      stream:write("That nickname is taken. Another one?\n")
    else
      return nick
    end
  end
end

local function rename(member, nick)
  if not valid_nick(nick) then return member:send("Not a valid nickname.\n") end
  if room[nick] then return member:send("That nickname is taken.\n") end
  say(("* %s is now %s\n"):format(member.nick, nick), member)
  room[member.nick], room[nick], member.nick = nil, member, nick
end

function ChatServer:handle_stream(stream)
  local nick = choose_nick(stream)
  if not nick then return end
  say(("* %s joined\n"):format(nick))
  local member = Member.join(stream, nick)
  member:send(("Hello %s! /who lists the room, /quit leaves.\n"):format(nick))
  while true do
    local line = read_line(stream)
    if not line or line == "/quit" then break end
    local new = line:match("^/nick%s+(%S+)$")
    if new then
      rename(member, new)
    elseif line == "/who" then
      local names = {}
      for name in pairs(room) do names[#names + 1] = name end
      table.sort(names)
      member:send("* here: " .. table.concat(names, ", ") .. "\n")
    elseif line ~= "" then
      say(("<%s> %s\n"):format(member.nick, line), member)
    end
  end
  leave(member)
  member:finish() -- returning lets the server flush and close the stream
end

local server = ChatServer()
local port = server:listen(opts.port, opts.host)
log.info("chat server listening on %s:%d", opts.host, port)
ioloop.current():start()
