local H = require "spec.helper"
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async
local TCPServer = tcpserver.TCPServer

local echo_lines = H.echo_lines

describe("TCPServer", function()
  local logs, restore
  before_each(function() logs, restore = H.capture_logs() end)
  after_each(function() restore() end)

  describe("construction", function()
    it("works as Class(opts), Class:new(opts) and a plain table", async(function()
      local Echo = TCPServer:extend()
      Echo.handle_stream = echo_lines
      local plain = setmetatable({handle_stream = echo_lines}, {__index = TCPServer})
      for _, server in ipairs {Echo(), Echo:new({max_buffer_size = 1024}), plain:new(), plain} do
        local port = server:listen(0, "127.0.0.1")
        local client = H.connect(port)
        client:write("ping\n")
        assert.equal("ping\n", client:read_until("\n"))
        client:close()
        server:stop()
      end
    end))

    it("calls initialize(opts) when a subclass defines it", function()
      local S = TCPServer:extend({initialize = function(self, opts) self.seen = opts end})
      local opts = {read_chunk_size = 4096}
      assert.equal(opts, S(opts).seen)
    end)

    it("leaves the options it does not know to the subclass's initialize", async(function()
      local Motd = TCPServer:extend()
      function Motd:initialize(opts) self.motd = opts.motd end
      function Motd:handle_stream(stream) stream:write(self.motd .. "\n") end
      local server = Motd({motd = "hello", max_buffer_size = 4096})
      assert.is_nil(server._tcpserver.options.motd)
      assert.equal(4096, server._tcpserver.options.max_buffer_size)
      local port = server:listen(0, "127.0.0.1")
      assert.equal("hello\n", H.connect(port):read_until_close())
      server:stop()
      -- a near miss of TCPServer's own names is still a typo
      assert.has_error(function() Motd({motd = "x", idle_timeot = 5}) end,
                       "TCPServer: unknown option 'idle_timeot' (did you mean 'idle_timeout'?)")
      assert.has_error(function() Motd({on_eror = print}) end,
                       "TCPServer: unknown option 'on_eror' (did you mean 'on_error'?)")
    end))

    it("rejects unknown options and bad values with a clear error", function()
      assert.has_error(function() TCPServer({max_bufer_size = 1}) end,
                       "TCPServer: unknown option 'max_bufer_size' (did you mean 'max_buffer_size'?)")
      assert.has_error(function() TCPServer({motd = "hi"}) end,
                       "TCPServer: unknown option 'motd' (a subclass takes options of its own in initialize(opts))")
      assert.has_error(function() TCPServer({max_buffer_size = -1}) end,
                       "TCPServer: option 'max_buffer_size' must be a positive integer below 4 GiB, got -1")
      assert.has_error(function() TCPServer({on_error = 1}) end,
                       "TCPServer: option 'on_error' must be a function, got 1")
      assert.has_error(function() TCPServer("x") end, "TCPServer: options must be a table")
    end)
  end)

  describe("listen", function()
    it("returns the bound port and can be called for several ports", async(function()
      local server = TCPServer:extend({handle_stream = echo_lines})()
      local p1 = server:listen(0, "127.0.0.1")
      local p2 = server:listen(0, "127.0.0.1")
      assert.is_true(p1 > 0 and p2 > 0 and p1 ~= p2)
      for _, port in ipairs {p1, p2} do
        local client = H.connect(port)
        client:write("x\n")
        assert.equal("x\n", client:read_until("\n"))
        client:close()
      end
      server:stop()
    end))

    it("raises when the port is taken", function()
      local server = TCPServer:extend({handle_stream = echo_lines})()
      local port = server:listen(0, "127.0.0.1")
      assert.has_error(function() TCPServer():listen(port, "127.0.0.1") end)
      local ok, err = pcall(TCPServer().listen, TCPServer(), port, "127.0.0.1")
      assert.is_false(ok)
      assert.matches("Address already in use", err)
      server:stop()
    end)

    it("serves a real client (Python's socket module)", async(function()
      local server, port = H.serve(echo_lines)
      local out, status = H.python([[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"hello\nworld\n")
f = s.makefile("rb")
sys.stdout.write((f.readline() + f.readline()).decode())
]], tostring(port))
      server:stop()
      assert.equal(0, status)
      assert.equal("hello\nworld\n", out)
    end))
  end)

  describe("handle_stream", function()
    it("gets the peer address as a table whose tostring is host:port", async(function()
      local address
      local server, port = H.serve(function(_, _, addr) address = addr end)
      local client = H.connect(port)
      local _, cport = client:getsockname()
      client:read_until_close()
      server:stop()
      assert.same({host = "127.0.0.1", port = cport, family = "inet"},
                  {host = address.host, port = address.port, family = address.family})
      assert.equal("127.0.0.1:" .. cport, tostring(address))
    end))

    it("flushes and closes the stream when it returns", async(function()
      local server, port = H.serve(function(_, stream)
        stream:write(("d"):rep(3 * 1024 * 1024))
        stream:write("end")
      end)
      local data = H.connect(port):read_until_close()
      server:stop()
      assert.equal(3 * 1024 * 1024 + 3, #data)
      assert.equal("end", data:sub(-3))
    end))

    it("logs an error with its traceback and address, and keeps serving", async(function()
      local server, port = H.serve(function(_, stream)
        local line = stream:read_until("\n")
        if line == "boom\n" then error("kaboom") end
        stream:write(line)
      end)
      local bad = H.connect(port)
      local _, bad_port = bad:getsockname()
      bad:write("boom\n")
      assert.same({"", nil}, {bad:read_until_close()})
      local good = H.connect(port)
      good:write("fine\n")
      assert.equal("fine\n", good:read_until("\n"))
      good:close()
      server:stop()
      assert.equal(1, #logs)
      assert.matches("^error: Uncaught error in handle_stream for 127.0.0.1:" .. bad_port, logs[1])
      assert.matches("kaboom", logs[1])
      assert.matches("stack traceback", logs[1])
    end))

    it("passes errors to on_error when given", async(function()
      local seen
      local server, port = H.serve(function() error({code = 42}) end, {
        on_error = function(self, err, traceback, address)
          seen = {self = self, err = err, traceback = traceback, address = address}
        end,
      })
      H.connect(port):read_until_close()
      server:stop()
      assert.equal(server, seen.self)
      assert.same({code = 42}, seen.err)
      assert.matches("stack traceback", seen.traceback)
      assert.equal("127.0.0.1", seen.address.host)
      assert.same({}, logs)
    end))

    it("lets on_error wait: it runs in a task of its own", async(function()
      local done = locks.Event()
      local server, port = H.serve(function() error("boom") end, {
        on_error = function()
          ioloop.sleep(0.01)
          done:set()
        end,
      })
      H.connect(port):read_until_close()
      assert.is_true(done:wait(5))
      server:stop()
      assert.same({}, logs)
    end))

    it("closes and reports the right stream when handle_stream reassigned its arguments",
       async(function()
      -- The core keeps the stream and address for the end of the task; the
      -- handler's own parameters may point elsewhere by then.
      local seen
      local server, port = H.serve(function(_, stream, address) -- luacheck: ignore 232
        stream:read_until("\n")
        stream, address = nil, "elsewhere" -- luacheck: ignore 311
        error("boom")
      end, {on_error = function(_, _, _, address) seen = address end})
      local client = H.connect(port)
      local _, client_port = client:getsockname()
      client:write("go\n")
      assert.equal("", client:read_until_close())
      H.wait_until(function() return seen end)
      assert.equal("127.0.0.1", seen.host)
      assert.equal(client_port, seen.port)
      assert.equal("inet", seen.family)
      assert.equal(0, server:connection_count())
      server:stop()
    end))

    it("closes the handler's to-be-closed variables when it raises", async(function()
      local closed_with
      local server, port = H.serve(function(_, stream)
        local guard <close> = -- luacheck: ignore 211
          setmetatable({}, {__close = function(_, err) closed_with = err end})
        stream:read_until("\n")
        error("boom", 0)
      end)
      local client = H.connect(port)
      client:write("go\n")
      client:read_until_close()
      server:stop()
      assert.equal("boom", closed_with)
      assert.matches("boom", logs[1])
    end))

    it("lets a finished handler's coroutine outlive its stream", async(function()
      -- its extra space pointed at the stream: core.resume must not read it
      local core = require "tcpserver.core"
      local co
      local server, port = H.serve(function() co = coroutine.running() end)
      H.connect(port):read_until_close()
      server:stop()
      H.wait_until(function() return co and coroutine.status(co) == "dead" end)
      collectgarbage()
      collectgarbage()
      assert.is_false(pcall(core.resume, co))
    end))

    it("reports a missing handle_stream", async(function()
      local server = TCPServer()
      local port = server:listen(0, "127.0.0.1")
      H.connect(port):read_until_close()
      server:stop()
      assert.matches("handle_stream is not implemented", logs[1])
    end))
  end)

  describe("stop", function()
    it("is harmless twice and refuses new connections; open streams live on", async(function()
      local server, port = H.serve(echo_lines)
      local client = H.connect(port)
      client:write("a\n")
      assert.equal("a\n", client:read_until("\n"))
      server:stop()
      server:stop()
      assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", port)})
      client:write("b\n")
      assert.equal("b\n", client:read_until("\n"))
      client:close()
    end))

    it("can be called from a handler while many clients connect", async(function()
      local _, port = H.serve(function(self, stream)
        self:stop()
        stream:write("bye\n")
      end)
      local done, results = 0, {}
      for i = 1, 50 do
        ioloop.current():spawn(function()
          local c = tcpclient.connect("127.0.0.1", port)
          results[i] = c and (c:read_until_close()) or "refused"
          done = done + 1
        end)
      end
      H.wait_until(function() return done == 50 end)
      local served = 0
      for i = 1, 50 do
        if results[i] == "bye\n" then served = served + 1 end
      end
      assert.is_true(served >= 1)
      assert.same({}, logs)
    end))
  end)

  it("stops accepting at max_connections and resumes below it", async(function()
    local release = locks.Event()
    local active, peak = 0, 0
    local server, port = H.serve(function(_, stream)
      active = active + 1
      peak = math.max(peak, active)
      stream:write("in\n")
      release:wait()
      active = active - 1
    end, {max_connections = 2})
    local clients = {}
    for i = 1, 3 do clients[i] = H.connect(port) end
    assert.equal("in\n", clients[1]:read_until("\n"))
    assert.equal("in\n", clients[2]:read_until("\n"))
    clients[3]:settimeout(0.2)
    assert.same({nil, "timeout"}, {clients[3]:read_until("\n")})
    release:set()
    clients[3]:settimeout(5)
    assert.equal("in\n", clients[3]:read_until("\n"))
    server:stop()
    assert.equal(2, peak)
  end))

  it("leaves a server made with in_stats = false out of tcpserver.stats()", async(function()
    local before = tcpserver.stats().connections_total
    local hidden, port = H.serve(function(_, stream) stream:write("x") end, {in_stats = false})
    assert.equal("x", H.connect(port):read_until_close())
    assert.equal(1, hidden:stats().connections_total)
    assert.equal(before, tcpserver.stats().connections_total)
    hidden:stop()
    assert.has_error(function() tcpserver.TCPServer({in_stats = "no"}) end,
                     "TCPServer: option 'in_stats' must be a boolean, got no")
  end))

  it("counts connections and handler errors in stats()", async(function()
    local release = locks.Event()
    local server, port = H.serve(function(_, stream)
      local line = stream:read_until("\n")
      if line == "boom\n" then error("boom") end
      release:wait()
    end)
    local before = tcpserver.stats()
    local a, b = H.connect(port), H.connect(port)
    a:write("wait\n")
    b:write("wait\n")
    H.wait_until(function() return server:connection_count() == 2 end)
    local bad = H.connect(port)
    bad:write("boom\n")
    bad:read_until_close()
    local stats = server:stats()
    assert.same({2, 3, 1}, {stats.connections_open, stats.connections_total, stats.handler_errors})
    for _, k in ipairs {"bytes_in", "bytes_out", "tls_handshake_failures"} do
      assert.equal("integer", math.type(stats[k]), k)
    end
    local all = tcpserver.stats()
    assert.same({2, 3, 1}, {all.connections_open - before.connections_open,
                            all.connections_total - before.connections_total,
                            all.handler_errors - before.handler_errors})
    release:set()
    a:read_until_close()
    b:read_until_close()
    server:stop()
    H.wait_until(function() return server:connection_count() == 0 end)
    stats = server:stats()
    assert.same({0, 3, 1}, {stats.connections_open, stats.connections_total, stats.handler_errors})
    assert.same({15, 0}, {stats.bytes_in, stats.bytes_out}) -- "wait\n" twice, "boom\n"
  end))

  it("counts bytes after TLS and failed handshakes in stats()", async(function()
    local C = H.certs()
    local server, port = H.serve(function(_, stream)
      stream:write(stream:read_until("\n"))
    end, {ssl_options = {certfile = C.server.certfile, keyfile = C.server.keyfile}})
    local c = assert(tcpclient.connect("127.0.0.1", port, {ssl_options = {cafile = C.cafile}}))
    c:write("0123456789\n")
    assert.equal("0123456789\n", c:read_until("\n"))
    c:close()
    local plain = H.connect(port)
    plain:write("GET / HTTP/1.0\r\n\r\n")
    plain:read_until_close()
    H.wait_until(function() return server:stats().tls_handshake_failures == 1 end)
    local stats = server:stats()
    server:stop()
    assert.same({11, 11, 1}, {stats.bytes_in, stats.bytes_out, stats.tls_handshake_failures})
  end))

  it("serves 1,000 concurrent connections", async(function()
    local server, port = H.serve(echo_lines)
    local n, done, ok = 1000, 0, 0
    local clients = {}
    for i = 1, n do
      ioloop.current():spawn(function()
        local c = assert(tcpclient.connect("127.0.0.1", port))
        clients[i] = c
        c:write("client " .. i .. "\n")
        if c:read_until("\n") == "client " .. i .. "\n" then ok = ok + 1 end
        done = done + 1
      end)
    end
    H.wait_until(function() return done == n end, 20)
    assert.equal(n, ok)
    assert.equal(n, server:connection_count())
    for i = 1, n do clients[i]:close() end
    H.wait_until(function() return server:connection_count() == 0 end)
    server:stop()
  end, 30))

  it("bind + start(1) serves in this process", async(function()
    local server = TCPServer:extend({handle_stream = echo_lines})()
    local port = server:bind(0, "127.0.0.1")
    server:start(1)
    local client = H.connect(port)
    client:write("s\n")
    assert.equal("s\n", client:read_until("\n"))
    client:close()
    server:stop()
  end))

  it("shutdown lets running handlers finish, then closes the rest", async(function()
    local finished = false
    local server, port = H.serve(function(_, stream)
      local line = stream:read_until("\n")
      if line == "slow\n" then
        ioloop.sleep(0.05)
        stream:write("done\n")
        finished = true
      else
        stream:read_until("\n") -- waits until shutdown closes it
      end
    end)
    local slow, idle = H.connect(port), H.connect(port)
    slow:write("slow\n")
    idle:write("idle\n")
    H.wait_until(function() return server:connection_count() == 2 end)
    local drained = locks.Event()
    server:shutdown(0.5, function() drained:set() end)
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", port)})
    assert.equal("done\n", slow:read_until("\n"))
    assert.is_true(drained:wait(5))
    assert.is_true(finished)
    assert.equal("", idle:read_until_close())
  end))
end)

describe("TCPServer idle connections", function()
  -- Bytes of the Lua heap, not timing: counted by Lua itself, the same on
  -- any machine. The stream, its task (stack and frames), the address and
  -- the books; docs/ARCHITECTURE.md breaks them down.
  it("cost at most 1,700 bytes of Lua heap each while their handler reads", async(function()
    local n = 400
    local server, port = H.serve(function(_, stream)
      while stream:read_until("\n") do end
    end)
    collectgarbage()
    collectgarbage()
    local before = collectgarbage("count")
    local clients = require("tcpserver.process").Subprocess({H.PYTHON, "-c", [[
import socket, sys
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
print("open", flush=True)
sys.stdin.read()
]], tostring(port), tostring(n)}, {stdin = "pipe", stdout = "pipe"})
    assert.equal("open\n", clients.stdout:read_until("\n"))
    H.wait_until(function() return server:connection_count() == n end)
    collectgarbage()
    collectgarbage()
    local per = (collectgarbage("count") - before) * 1024 / n
    clients.stdin:close()
    clients:wait_for_exit()
    H.wait_until(function() return server:connection_count() == 0 end)
    server:stop()
    assert.is_true(per <= 1700, ("%.0f bytes per idle connection"):format(per))
    assert.is_true(per >= 1000, "the count missed the connections")
  end))
end)

describe("TCPServer out of file descriptors", function()
  it("backs off, logs once and recovers", H.async(function()
    local process = require "tcpserver.process"
    local script = H.script_file(H.ECHO_SCRIPT)
    local p = process.Subprocess({"sh", "-c", "ulimit -n 24 && exec " .. H.LUAHOST .. " " .. script},
                                 {stdout = "pipe", stderr = "pipe"})
    local port = tonumber(p.stdout:read_until("\n"))
    local clients = {}
    for i = 1, 40 do clients[i] = H.connect(port) end
    -- The first ones are served until the server runs out of descriptors.
    clients[1]:write("first\n")
    assert.equal("first\n", clients[1]:read_until("\n"))
    local err = p.stderr:read_until("\n")
    assert.matches("accept: Too many open files; retrying every 100 ms", err)
    -- Closing clients frees descriptors: every later client is served.
    for i = 1, 20 do clients[i]:close() end
    for i = 21, 40 do
      clients[i]:write("late " .. i .. "\n")
      assert.equal("late " .. i .. "\n", clients[i]:read_until("\n"))
      clients[i]:close()
    end
    p:kill(15)
    assert.same({0, 0}, {p:wait_for_exit()})
    assert.equal("", p.stderr:read_until_close():gsub("[^\n]*INFO[^\n]*\n", ""))
    os.remove(script)
  end, 20))
end)
