-- Shared by the ports of Tornado's own tests (spec/tornado/*_spec.lua):
-- stream pairs like Tornado's make_iostream_pair, and a small future for
-- the calls Tornado starts without awaiting.
local H = require "spec.helper"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local process = require "tcpserver.process"
local ssl = require "tcpserver.ssl"
local tcpclient = require "tcpserver.tcpclient"

local T = {}

local deferred = {}

--- Runs `fn` after the current spec (T.cleanup, which each spec file
-- registers with after_each: busted's `finally` is not visible here).
function T.defer(fn)
  deferred[#deferred + 1] = fn
end

function T.cleanup()
  local fns = deferred
  deferred = {}
  for i = #fns, 1, -1 do fns[i]() end
end

local Future = {}
Future.__index = Future

--- Runs fn(...) in a task of its own, as Tornado runs a coroutine it does not
-- await yet; the task starts now and runs until it first waits.
function T.future(fn, ...)
  local f = setmetatable({event = locks.Event()}, Future)
  ioloop.current():spawn(function(...)
    f.values = table.pack(pcall(fn, ...))
    f.event:set()
  end, ...)
  return f
end

function Future:done() return self.event:is_set() end

--- Waits for the task (`timeout` seconds, 5 by default) and returns its
-- results, or raises its error.
function Future:result(timeout)
  timeout = timeout or 5
  assert(self.event:wait(timeout), ("future: no result within %g s"):format(timeout))
  if not self.values[1] then error(self.values[2], 0) end
  return table.unpack(self.values, 2, self.values.n)
end

--- TLS options for the server side of a pair (the test CA's localhost certificate).
function T.server_ssl(name)
  local c = H.certs()[name or "server"]
  return {certfile = c.certfile, keyfile = c.keyfile}
end

-- A connected pair: rs is the server's stream (it gets `opts`, the
-- TCPServer options, as Tornado's make_iostream_pair passes its kwargs),
-- ws the client's. The handler that got rs waits until the spec ends.
local function socket_pair(opts, client_opts)
  local accepted, release = locks.Event(), locks.Event()
  local rs
  local server, port = H.serve(function(_, stream)
    rs = stream
    accepted:set()
    release:wait()
  end, opts)
  local ws = assert(tcpclient.connect("127.0.0.1", port, client_opts))
  assert(accepted:wait(5), "pair: the server never got the connection")
  server:stop()
  T.defer(function()
    rs:close()
    ws:close()
    release:set()
  end)
  return rs, ws
end

local function with(opts, extra)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  for k, v in pairs(extra) do o[k] = v end
  return o
end

--- The kinds of pairs Tornado's mixins run over; each makes (rs, ws) from
-- TCPServer options. `options` is false where the pair cannot take them.
T.PAIRS = {
  {name = "TestIOStream", options = true, make = function(opts) return socket_pair(opts) end},
  -- Tornado's client here uses cert_reqs=CERT_NONE.
  {name = "TestIOStreamSSL", options = true, make = function(opts)
    return socket_pair(with(opts, {ssl_options = T.server_ssl()}), {ssl_options = {verify = "none"}})
  end},
  -- The same with ready-made contexts on both sides instead of option tables.
  {name = "TestIOStreamSSLContext", options = true, make = function(opts)
    return socket_pair(with(opts, {ssl_options = ssl.context(T.server_ssl())}),
                       {ssl_options = ssl.context({verify = "none"})})
  end},
  -- Tornado's PipeIOStream pair is os.pipe(); here the two ends of a `cat`
  -- (what is written to its stdin comes out of its stdout; closing stdin
  -- ends cat, which closes stdout). No TCPServer options apply.
  {name = "TestPipeIOStream", options = false, make = function()
    local p = process.Subprocess({"cat"}, {stdin = "pipe", stdout = "pipe"})
    T.defer(function()
      p.stdin:close()
      p.stdout:close()
      p:kill(9)
    end)
    return p.stdout, p.stdin
  end},
}

--- For tests that fail because of a known core defect: known(name, fn)
-- runs fn; if `name` is in `list` (name -> reason, or {reason, flaky = true}
-- for a defect that shows only in some runs), a failure marks the spec
-- pending (busted's `pending`, passed in) with the reason and the error, and
-- a pass fails it (pending again if flaky), so that the entry gets removed
-- once the core is fixed.
function T.known_failures(list, pending)
  return function(name, fn)
    local why = list[name]
    if not why then return fn() end
    local flaky = type(why) == "table" and why.flaky
    if type(why) == "table" then why = why[1] end
    local ok, err = pcall(fn)
    if ok and flaky then
      return pending("core defect (timing-dependent, not seen this run): " .. why)
    end
    if ok then error(name .. " passes now: remove it from KNOWN_FAIL", 0) end
    if type(err) == "table" then err = err.message or err[1] end
    pending(("core defect: %s -- got: %s"):format(why, tostring(err):match("^[^\n]*")))
  end
end

--- Spawns fn(...) in a task of its own (the writer Tornado never awaits).
function T.go(fn, ...)
  ioloop.current():spawn(fn, ...)
end

return T
