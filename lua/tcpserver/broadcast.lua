--- A topic that publishes to many subscribers, each with a bounded queue
-- of its own, so that one slow subscriber neither stalls the publisher
-- nor grows without bound. What happens to a subscriber whose queue is
-- full is its policy, chosen when it subscribes:
--
--   "drop"         it is dropped: unsubscribed, its on_drop called; what
--                  it had queued can still be read, then get gives nil,
--                  "closed";
--   "drop_oldest"  its oldest queued message makes room, and its
--                  `dropped` count goes up.
--
--     local topic = broadcast.Topic()
--     local sub = topic:subscribe(256, "drop")
--     topic:publish("hello\n")
--     for msg in sub:messages() do stream:write(msg) end
local queues = require "tcpserver.queues"

local M = {}

local CLOSED = setmetatable({}, {__tostring = function() return "closed" end})

local Subscription = {}
Subscription.__index = Subscription

local Topic = {}
Topic.__index = Topic

--- A new topic with no subscribers.
function M.Topic()
  return setmetatable({subs = {}, n = 0}, Topic)
end

local POLICIES = {drop = true, drop_oldest = true}

--- subscribe(maxsize, policy [, on_drop]) -> a Subscription holding at
-- most `maxsize` (> 0) messages; `on_drop(sub)` runs when the "drop"
-- policy drops it.
function Topic:subscribe(maxsize, policy, on_drop)
  if math.type(maxsize) ~= "integer" or maxsize < 1 then
    error("subscribe: maxsize must be a positive integer", 2)
  end
  if not POLICIES[policy] then
    error("subscribe: policy must be \"drop\" or \"drop_oldest\"", 2)
  end
  if on_drop ~= nil and type(on_drop) ~= "function" then
    error("subscribe: on_drop must be a function", 2)
  end
  local sub = setmetatable({
    topic = self, queue = queues.Queue(maxsize + 1), -- + 1: room for the end mark
    max = maxsize, policy = policy, on_drop = on_drop, dropped = 0, closed = false,
  }, Subscription)
  self.subs[sub] = true
  self.n = self.n + 1
  return sub
end

--- The number of subscribers.
function Topic:count()
  return self.n
end

-- Queues msg for sub under its policy: true, or false if sub must be
-- dropped (its queue is full and its policy is "drop").
local function deliver(sub, msg)
  local q = sub.queue
  if q:qsize() >= sub.max then
    if sub.policy == "drop" then return false end
    q:get_nowait() -- drop_oldest
    sub.dropped = sub.dropped + 1
  end
  q:put_nowait(msg)
  return true
end

local function drop(list)
  for _, sub in ipairs(list) do -- after delivering: on_drop may publish
    if not sub.closed then
      sub:close()
      if sub.on_drop then sub.on_drop(sub) end
    end
  end
end

--- publish(msg [, except]): queues `msg` (not nil) for every subscriber
-- but `except`; returns how many got it. Never waits.
function Topic:publish(msg, except)
  if msg == nil then error("publish: the message must not be nil", 2) end
  local reached, dropped = 0, nil
  for sub in pairs(self.subs) do
    if sub ~= except then
      if deliver(sub, msg) then
        reached = reached + 1
      else
        dropped = dropped or {}
        dropped[#dropped + 1] = sub
      end
    end
  end
  if dropped then drop(dropped) end
  return reached
end

--- Queues `msg` for this subscriber alone, under its policy (a reply to
-- it, in order with what the topic says); false if it is closed or was
-- dropped by it.
function Subscription:send(msg)
  if msg == nil then error("send: the message must not be nil", 2) end
  if self.closed then return false end
  if deliver(self, msg) then return true end
  drop({self})
  return false
end

--- get([timeout]) -> the next message, or nil and "timeout" or "closed"
-- (unsubscribed or dropped, and nothing left queued).
function Subscription:get(timeout)
  local q = self.queue
  if self.closed and q:empty() then return nil, "closed" end
  local msg, err = q:get(timeout)
  if msg == CLOSED then return nil, "closed" end
  return msg, err
end

--- An iterator over the messages, waiting for each, until the
-- subscription closes.
function Subscription:messages()
  return function() return (self:get()) end
end

--- Leaves the topic (idempotent); a waiting get returns nil, "closed".
function Subscription:close()
  if self.closed then return end
  self.closed = true
  local topic = self.topic
  topic.subs[self] = nil
  topic.n = topic.n - 1
  if self.queue:empty() then self.queue:put_nowait(CLOSED) end -- wakes a getter
end

--- The number of messages queued.
function Subscription:qsize()
  local q = self.queue
  return q:qsize()
end

return M
