-- Chat server: pick a nickname, then every line you send goes to everyone
-- else in the room.
--   luahost examples/chat.lua [--port 8890] [--host 127.0.0.1] [--max-queue BYTES]
-- Try it with two terminals running `nc 127.0.0.1 8890`.
--
-- Commands: /nick NAME (rename), /who (who is here), /quit.
--
-- The pattern to copy: a broadcast never writes to a stream. Each client
-- has an outbox (a queue of lines) and exactly one writer task, the only
-- code that calls write() on that stream. A broadcast appends to every
-- outbox and returns at once, so one slow reader cannot stall the sender,
-- and no stream ever sees two writes at the same time. A client whose
-- outbox grows past --max-queue bytes (it stopped reading while the room
-- kept talking) is dropped: its stream is closed, and everyone else goes on.
-- A client costs at most the stream's write buffer (write() waits past
-- 1 MiB) plus --max-queue. (Writing to one stream from several tasks
-- works, their writes queue in order, but then one slow reader makes every
-- task that writes to it wait: the outbox keeps the senders free.)
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg,
  {port = 8890, host = "127.0.0.1", max_queue = 256 * 1024})

local MAX_LINE = 4096 -- longer lines close the connection ("too large")

local room = {} -- nickname -> Client

-- ---- a client: its stream, its outbox and its writer task -------------------

local Client = {}
Client.__index = Client

function Client.new(stream)
  local self = setmetatable({
    stream = stream,
    outbox = {}, queued = 0,   -- lines not yet handed to write(), their size
    wake = locks.Event(),      -- set when the outbox has lines (or we end)
    done = locks.Event(),      -- set when the writer task has finished
  }, Client)
  ioloop.current():spawn(function() self:write_loop() end)
  return self
end

--- Queues a line for this client; never waits, never writes. Returns
-- false when the client's outbox is over the cap: it stopped reading.
function Client:send(line)
  if self.dropped then return true end
  self.queued = self.queued + #line
  if self.queued > opts.max_queue then return false end
  self.outbox[#self.outbox + 1] = line
  self.wake:set()
  return true
end

--- Policy for a client that cannot keep up: close its stream. close()
-- first tries to hand over what is already written (for up to 10 s);
-- then the client's reader and writer see "closed" and its handler ends.
-- Once: leave's own broadcast may drop a client the caller drops next.
function Client:drop(reason)
  if self.dropped then return end
  self.dropped = reason
  log.warning("dropping %s: %s", self.nick, reason)
  self.stream:close()
  self.wake:set()
end

-- The writer task: takes the whole outbox and writes it as one writev.
-- write() returns at once unless the stream's buffer is over its
-- high-water mark (the client reads slowly); then this task waits, lines
-- pile up in the outbox, and past the cap the client is dropped.
function Client:write_loop()
  while true do
    if #self.outbox > 0 then
      local batch = self.outbox
      self.outbox, self.queued = {}, 0
      if not self.stream:write(batch) then break end -- closed
    elseif self.finished or self.dropped then
      break
    else
      self.wake:clear()
      self.wake:wait()
    end
  end
  self.done:set()
end

--- Lets the writer send what is queued, then waits for it to end.
function Client:finish()
  self.finished = true
  self.wake:set()
  self.done:wait()
end

local leave

-- Sends a line to everyone in the room but `except`, then drops those
-- whose outbox overflowed (after the loop: the room changes when they leave).
local function broadcast(line, except)
  local slow = {}
  for _, client in pairs(room) do
    if client ~= except and not client:send(line) then slow[#slow + 1] = client end
  end
  for _, client in ipairs(slow) do
    client:drop("too slow")
    leave(client, " (dropped: too slow)")
  end
end

function leave(client, why)
  if room[client.nick] ~= client then return end -- already gone
  room[client.nick] = nil
  broadcast(("* %s left%s\n"):format(client.nick, why or ""))
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
local function choose_nick(client)
  client:send("Welcome! Your nickname?\n")
  while true do
    local nick = read_line(client.stream)
    if not nick then return nil end
    if not valid_nick(nick) then
      client:send("Letters, digits, _ and - only (at most 20). Your nickname?\n")
    elseif room[nick] then
      client:send("That nickname is taken. Another one?\n")
    else
      return nick
    end
  end
end

local function rename(client, nick)
  if not valid_nick(nick) then return client:send("Not a valid nickname.\n") end
  if room[nick] then return client:send("That nickname is taken.\n") end
  broadcast(("* %s is now %s\n"):format(client.nick, nick), client)
  room[client.nick], room[nick], client.nick = nil, client, nick
end

function ChatServer:handle_stream(stream)
  local client = Client.new(stream)
  local nick = choose_nick(client)
  if nick then
    client.nick, room[nick] = nick, client
    broadcast(("* %s joined\n"):format(nick), client)
    client:send(("Hello %s! /who lists the room, /quit leaves.\n"):format(nick))
    while true do
      local line = read_line(stream)
      if not line or line == "/quit" then break end
      local new = line:match("^/nick%s+(%S+)$")
      if new then
        rename(client, new)
      elseif line == "/who" then
        local names = {}
        for name in pairs(room) do names[#names + 1] = name end
        table.sort(names)
        client:send("* here: " .. table.concat(names, ", ") .. "\n")
      elseif line ~= "" then
        broadcast(("<%s> %s\n"):format(client.nick, line), client)
      end
    end
    leave(client)
  end
  client:finish() -- returning lets the server flush and close the stream
end

local server = ChatServer()
local port = server:listen(opts.port, opts.host)
log.info("chat server listening on %s:%d", opts.host, port)
ioloop.current():start()
