local H = require "spec.helper"
local P = require "spec.procs"
local ioloop = require "tcpserver.ioloop"
local socket = require "tcpserver.socket"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async

-- A server whose handler gets every line and may answer: reply(line) -> string.
local function line_server(reply)
  return H.serve(function(_, stream)
    while true do
      local line = stream:read_until("\n")
      if not line then return end
      local out = reply(line, stream)
      if out then stream:write(out) end
    end
  end)
end

describe("tcpserver.socket (LuaSocket's TCP face)", function()
  after_each(P.cleanup)

  it("connects, sends and receives with LuaSocket's patterns and results", async(function()
    local server, port = line_server(function(line)
      if line == "lines\n" then return "one\r\ntw\ro\r\n" end
      if line == "bytes\n" then return "0123456789" end
      return line
    end)
    finally(function() server:stop() end)
    local sock = assert(socket.connect("127.0.0.1", port))
    assert.equal(6, sock:send("lines\n"))
    assert.equal("one", sock:receive("*l"))   -- CR and LF dropped
    assert.equal("two", sock:receive("l"))    -- every CR
    assert.equal(7, sock:send("xbytes\nx", 2, 7)) -- bytes 2..7: "bytes\n"; the last index
    assert.equal("pre0123", sock:receive(4, "pre"))
    assert.is_true(sock:dirty()) -- "456789" waits unread
    assert.equal("456789", sock:receive(6))
    assert.is_false(sock:dirty())
    local host, p = sock:getpeername()
    assert.same({"127.0.0.1", port}, {host, p})
    assert.equal(1, sock:setoption("tcp-nodelay", true))
    assert.is_true(sock:getoption("tcp-nodelay"))
    local received, sent, age = sock:getstats()
    assert.same({3 + 3 + 4 + 6, 6 + 6}, {received, sent}) -- a line's CR and LF are not counted
    assert.is_true(age >= 0)
    assert.equal(1, sock:close())
    assert.same({nil, "closed", ""}, {sock:receive()})
  end))

  it("polls with settimeout(0), times out, and ends with 'closed' and the partial", async(function()
    local server, port = line_server(function(line, stream)
      if line == "partial\n" then
        stream:write("no end")
        stream:close()
      end
    end)
    finally(function() server:stop() end)
    local sock = assert(socket.connect("127.0.0.1", port))
    sock:settimeout(0)
    assert.same({nil, "timeout", ""}, {sock:receive()})
    sock:settimeout(0.05, "t")
    assert.same({nil, "timeout", ""}, {sock:receive(10)})
    sock:settimeout(nil)
    sock:send("partial\n")
    assert.same({nil, "closed", "no end"}, {sock:receive("*l")})
    local s2 = assert(socket.connect("127.0.0.1", port))
    s2:send("partial\n")
    assert.equal("no end", s2:receive("*a")) -- the end is no error for "*a"
  end))

  it("gives LuaSocket's errors for a refused connection and a bad host", async(function()
    local port = P.free_port()
    assert.same({nil, "connection refused"}, {socket.connect("127.0.0.1", port)})
    assert.same({nil, "host not found"}, {socket.connect("no-such-host.invalid", 80)})
    assert.same({nil, "host not found"}, {socket.connect("", 80)})
    assert.same({nil, "host not found"}, {socket.dns.toip("no-such-host.invalid")})
    assert.equal("127.0.0.1", socket.dns.toip("127.0.0.1"))
    assert.equal("string", type(socket.dns.gethostname()))
    assert.is_true(math.abs(socket.gettime() - os.time()) < 2)
  end))

  it("upgrades to TLS with OpenResty's sslhandshake and LuaSec's wrap + dohandshake",
     async(function()
    local C = H.certs()
    local server, port = H.serve(H.echo_lines, {ssl_options = {certfile = C.server.certfile,
                                                               keyfile = C.server.keyfile}})
    finally(function() server:stop() end)
    local sock = assert(socket.connect("127.0.0.1", port))
    sock.ssl_options = {cafile = C.cafile}
    assert.is_true(sock:sslhandshake(nil, "localhost", true))
    sock:send("over tls\n")
    assert.equal("over tls", sock:receive())
    sock:close()
    local plain = assert(socket.connect("127.0.0.1", port))
    local wrapped = socket.ssl.wrap(plain, {cafile = C.cafile})
    wrapped:sni("localhost")
    assert.is_true(wrapped:dohandshake())
    wrapped:send("wrapped\n")
    assert.equal("wrapped", wrapped:receive())
    wrapped:close()
    local bad = assert(socket.connect("127.0.0.1", port))
    bad.ssl_options = {cafile = C.cafile}
    local ok, err = bad:sslhandshake(nil, "wrong.test", true)
    assert.is_nil(ok)
    assert.matches("hostname mismatch", err)
    bad:close()
  end))

  it("talks to a real LuaSocket server (lua-socket) in another process", async(function()
    local p = P.lua([[
local socket = require "socket"
local server = assert(socket.bind("127.0.0.1", 0))
print((select(2, server:getsockname())))
io.stdout:flush()
local c = assert(server:accept())
while true do
  local line, err = c:receive("*l")
  if not line then break end
  c:send(line:upper() .. "\r\n")
end
c:close()
]])
    local port = tonumber(p.out:await("^(%d+)$"))
    local sock = assert(socket.connect("127.0.0.1", port))
    for _, w in ipairs {"alpha", "beta", ("x"):rep(100000)} do
      assert.equal(#w + 1, sock:send(w .. "\n"))
      assert.equal(w:upper(), sock:receive())
    end
    sock:close()
    assert.equal(0, p:wait())
  end))
end)

-- redis-server on a free port for the spec, with DEBUG allowed.
local function start_redis()
  local port = P.free_port()
  local proc = require("tcpserver.process").Subprocess(
    {"redis-server", "--port", tostring(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
     "no", "--enable-debug-command", "yes"}, {stdout = "null", stderr = "null"})
  H.wait_until(function()
    local c = tcpclient.connect("127.0.0.1", port)
    if c then c:close() end
    return c
  end, 10)
  finally(function() proc:kill() end)
  return port
end

-- Debian's lua-redis, unchanged (its 5.3 copy: Debian builds none for 5.4).
local function load_redis()
  socket.install()
  return dofile(assert(package.searchpath("redis", "/usr/share/lua/5.3/?.lua;/usr/share/lua/5.4/?.lua")))
end

describe("lua-redis through tcpserver.socket", function()
  it("works unchanged, and while Redis sleeps the loop keeps serving", async(function()
    local port = start_redis()
    local redis = load_redis()
    local client = redis.connect("127.0.0.1", port)
    assert.is_true(client:ping())
    assert.is_true(client:set("k", "v"))
    assert.equal("v", client:get("k"))
    local ticks = 0
    local ticker = ioloop.current():spawn(function()
      for _ = 1, 20 do
        ioloop.sleep(0.01)
        ticks = ticks + 1
      end
    end)
    local slow = redis.connect("127.0.0.1", port)
    slow:raw_cmd("DEBUG SLEEP 0.3\r\n") -- Redis stalls; this task waits, the loop does not
    assert.is_true(ticks >= 15, ticks)
    ticker:join()
    assert.equal("v", client:get("k"))
  end))

  it("reuses pooled connections: setkeepalive, getreusedtimes, CLIENT LIST", async(function()
    local port = start_redis()
    local redis = load_redis()
    for i = 1, 5 do
      local sock = socket.tcp()
      assert(sock:connect("127.0.0.1", port))
      assert.equal(i - 1, sock:getreusedtimes())
      local client = redis.connect({socket = sock})
      assert.is_true(client:set("n", tostring(i)))
      assert.equal(1, sock:setkeepalive(10, 4))
    end
    local sock = socket.tcp()
    assert(sock:connect("127.0.0.1", port))
    assert.equal(5, sock:getreusedtimes()) -- the one connection, again
    local admin = redis.connect({socket = sock})
    local _, conns = admin:client("list"):gsub("id=%d+", "")
    assert.equal(1, conns) -- six clients, one connection
  end))
end)

describe("connection pools (tcpclient and IOStream)", function()
  it("keeps at most pool_size open with a backlog, queues up to it, refuses past it",
     async(function()
    local server, port = line_server(function(line) return line end)
    finally(function() server:stop() end)
    local opts = {pool = "capped", pool_size = 2, backlog = 1, timeout = 0.2}
    local a = assert(tcpclient.connect("127.0.0.1", port, opts))
    local b = assert(tcpclient.connect("127.0.0.1", port, opts))
    local waiting = ioloop.current():spawn(tcpclient.connect, "127.0.0.1", port, opts)
    assert.same({nil, "too many waiting connect operations"},
                {tcpclient.connect("127.0.0.1", port, opts)})
    assert.is_true(a:set_keepalive()) -- back in the pool: the waiter takes a's permit's turn
    local ok, c = waiting:join(1)
    assert.is_true(ok)
    assert.equal(1, c:getreusedtimes()) -- it got a, reused
    c:write("still works\n")
    assert.equal("still works\n", c:read_until("\n"))
    b:close() -- a permit is free again
    local d = assert(tcpclient.connect("127.0.0.1", port, opts))
    assert.equal(0, d:getreusedtimes())
    assert.same({true, nil, "timeout"}, {ioloop.current():spawn(tcpclient.connect, "127.0.0.1", port,
                                                              opts):join(1)})
    c:close()
    d:close()
  end))

  it("closes an idle connection at its idle timeout, and keeps at most pool_size idle",
     async(function()
    local closed = 0
    local server, port = H.serve(function(_, stream)
      stream:read_until_close()
      closed = closed + 1
    end)
    finally(function() server:stop() end)
    local opts = {pool = "idle"}
    local s1 = assert(tcpclient.connect("127.0.0.1", port, opts))
    assert.is_true(s1:set_keepalive(0.05))
    H.wait_until(function() return closed == 1 end) -- its idle timeout closed it
    local s2 = assert(tcpclient.connect("127.0.0.1", port, opts))
    assert.equal(0, s2:getreusedtimes())
    local s3 = assert(tcpclient.connect("127.0.0.1", port, opts))
    assert.is_true(s2:set_keepalive(10, 1))
    assert.is_true(s3:set_keepalive(10, 1)) -- the pool is full: this one closes
    H.wait_until(function() return closed == 2 end)
    assert.equal(1, require("tcpserver.pool").stats().idle.idle)
  end))

  it("never hands out a connection its peer closed or one with unread bytes", async(function()
    local server, port = line_server(function(line, stream)
      if line == "bye\n" then stream:close() end
      if line == "extra\n" then return "one\ntwo\n" end
    end)
    finally(function() server:stop() end)
    local s1 = assert(tcpclient.connect("127.0.0.1", port))
    s1:write("extra\n")
    assert.equal("one\n", s1:read_until("\n"))
    H.wait_until(function() return s1:buffer_sizes() > 0 end)
    assert.same({nil, "unread data"}, {s1:set_keepalive()})
    assert.is_true(s1:closed())
    local s2 = assert(tcpclient.connect("127.0.0.1", port))
    assert.is_true(s2:set_keepalive())
    local s3 = assert(tcpclient.connect("127.0.0.1", port))
    assert.equal(1, s3:getreusedtimes())
    s3:write("bye\n")
    assert.is_true(s3:set_keepalive()) -- kept, but its peer closes it meanwhile
    H.wait_until(function() return s3:closed() end)
    local s4 = assert(tcpclient.connect("127.0.0.1", port))
    assert.equal(0, s4:getreusedtimes()) -- a new one
    s4:close()
  end))
end)
