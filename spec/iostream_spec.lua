local H = require "spec.helper"
local locks = require "tcpserver.locks"
local ioloop = require "tcpserver.ioloop"

local async = H.async

-- A client that reads one line, then resets the connection (SO_LINGER 0).
local function reset_after_line(port)
  H.python([[
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.makefile("rb").readline()
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
]], tostring(port))
end

-- A server that hands each stream to `fn` and a connected client stream.
local function pair(fn, opts)
  local server, port = H.serve(fn, opts)
  finally(function() server:stop() end)
  return H.connect(port), server
end

describe("IOStream", function()
  describe("read_until", function()
    it("returns data including the delimiter", async(function()
      local client = pair(function(_, stream)
        stream:write(stream:read_until("\n"))
      end)
      client:write("hello\nrest")
      assert.equal("hello\n", client:read_until("\n"))
      client:close()
    end))

    it("finds a delimiter split across many reads", async(function()
      local got = {}
      local client = pair(function(_, stream)
        for _ = 1, 3 do got[#got + 1] = stream:read_until("\n") end
        stream:write("done\n")
      end, {read_chunk_size = 1})
      client:write("abcdefghij\nklmnopq\nr\n")
      assert.equal("done\n", client:read_until("\n"))
      assert.same({"abcdefghij\n", "klmnopq\n", "r\n"}, got)
    end))

    -- What two read_until(delim) return of `data`, sent at once and read
    -- chunk bytes at a time.
    local function two_reads(delim, data, chunk)
      local got = {}
      local client = pair(function(_, stream)
        got[1] = stream:read_until(delim)
        got[2] = stream:read_until(delim)
        stream:write("ok\n")
      end, {read_chunk_size = chunk})
      client:write(data)
      assert.equal("ok\n", client:read_until("\n"))
      client:close()
      return got
    end

    it("finds a multi-byte delimiter after many bytes that only begin it", async(function()
      for _, chunk in ipairs {3, 64} do
        assert.same({("\r"):rep(40) .. "\r\n", ("a\r"):rep(20) .. "\r\n"},
                    two_reads("\r\n", ("\r"):rep(40) .. "\r\n" .. ("a\r"):rep(20) .. "\r\n", chunk),
                    "read_chunk_size " .. chunk)
      end
    end))

    it("finds a multi-byte delimiter split across read boundaries", async(function()
      for chunk = 1, 7 do
        assert.same({"GET / HTTP/1.0\r\nHost: x\r\n\r\n", "ab\r\n\r\r\n\r\n"},
                    two_reads("\r\n\r\n", "GET / HTTP/1.0\r\nHost: x\r\n\r\nab\r\n\r\r\n\r\n", chunk),
                    "read_chunk_size " .. chunk)
      end
    end))

    it("reads a 1 MiB line", async(function()
      local line = ("x"):rep(1024 * 1024 - 1) .. "\n"
      local client = pair(function(_, stream)
        local got = stream:read_until("\n")
        stream:write(tostring(#got) .. "\n")
        stream:write(got)
      end)
      client:write(line)
      assert.equal(tostring(#line) .. "\n", client:read_until("\n"))
      assert.equal(line, client:read_until("\n"))
    end))

    it("keeps 10,000 pipelined lines in order", async(function()
      local client = pair(function(_, stream)
        while true do
          local line = stream:read_until("\n")
          if not line then break end
          stream:write(line)
        end
      end)
      local lines = {}
      for i = 1, 10000 do lines[i] = "line " .. i .. "\n" end
      client:write(lines)
      for i = 1, 10000 do
        local got = client:read_until("\n")
        if got ~= lines[i] then assert.equal(lines[i], got) end
      end
      client:close()
    end))

    it("fails with 'too large' past max_bytes and closes the stream", async(function()
      local result = {}
      local client = pair(function(_, stream)
        result = {stream:read_until("\n", 10)}
        result.closed = stream:closed()
      end)
      client:write("0123456789abcdef\n")
      local data, err = client:read_until_close()
      assert.equal("", data, err)
      assert.same({nil, "too large"}, {result[1], result[2]})
      assert.is_true(result.closed)
    end))

    it("fails when the delimiter ends past max_bytes, also from the buffer", async(function()
      local result
      local client = pair(function(_, stream)
        assert.equal("ab", stream:read_bytes(2))
        result = {stream:read_until("\n", 5)}
      end)
      client:write("ab12345\n")
      client:read_until_close()
      assert.same({nil, "too large"}, result)
    end))

    it("accepts a delimiter that ends exactly at max_bytes", async(function()
      local client = pair(function(_, stream)
        stream:write(stream:read_until("\n", 5))
      end)
      client:write("1234\n")
      assert.equal("1234\n", client:read_until("\n"))
    end))

    it("fails with 'too large' past max_buffer_size", async(function()
      local result
      local client = pair(function(_, stream)
        result = {stream:read_until("\n")}
      end, {max_buffer_size = 1024})
      client:write(("y"):rep(4096))
      client:read_until_close()
      assert.same({nil, "too large"}, result)
    end))

    it("raises on a second concurrent read", async(function()
      local err
      local client = pair(function(_, stream)
        ioloop.current():spawn(function() stream:read_until("\n") end)
        local ok, e = pcall(stream.read_until, stream, "\n")
        err = not ok and e
      end)
      client:read_until_close()
      assert.matches("already reading", err)
    end))

    it("rejects bad arguments", async(function()
      local errs = {}
      local client = pair(function(_, stream)
        errs[1] = select(2, pcall(stream.read_until, stream, ""))
        errs[2] = select(2, pcall(stream.read_until, stream, 5 > 4))
        errs[3] = select(2, pcall(stream.read_bytes, stream, -1))
        errs[4] = select(2, pcall(stream.write, stream, {1, 2}))
      end)
      client:read_until_close()
      assert.matches("empty delimiter", errs[1])
      assert.matches("string expected", errs[2])
      assert.matches("negative", errs[3])
      assert.matches("not a string", errs[4])
    end))
  end)

  describe("max_buffer_size", function()
    it("limits what is buffered, not the total: 100 reads of 1 KiB with 10 KiB", async(function()
      local got = 0
      local client = pair(function(_, stream)
        for _ = 1, 100 do
          if #assert(stream:read_bytes(1024)) == 1024 then got = got + 1 end
        end
        stream:write("done\n")
      end, {max_buffer_size = 10 * 1024})
      for _ = 1, 100 do client:write(("k"):rep(1024)) end
      assert.equal("done\n", client:read_until("\n"))
      assert.equal(100, got)
    end))

    it("lets 10 MB through a 5 MB limit while the reader keeps up", async(function()
      local total = 0
      local client = pair(function(_, stream)
        while total < 10 * 1000 * 1000 do
          local data = assert(stream:read_bytes(64 * 1024, true))
          total = total + #data
        end
        stream:write("ok\n")
      end, {max_buffer_size = 5 * 1000 * 1000})
      local chunk = ("m"):rep(100 * 1000)
      for _ = 1, 100 do assert(client:write(chunk)) end
      assert.equal("ok\n", client:read_until("\n"))
      assert.equal(10 * 1000 * 1000, total)
    end))
  end)

  describe("read_bytes", function()
    it("returns exactly n bytes, and '' for 0", async(function()
      local got = {}
      local client = pair(function(_, stream)
        got[1] = stream:read_bytes(0)
        got[2] = stream:read_bytes(3)
        got[3] = stream:read_bytes(4)
      end)
      client:write("abcdefgh")
      client:read_until_close()
      assert.same({"", "abc", "defg"}, got)
    end))

    it("with partial returns 1..n bytes as soon as any arrive", async(function()
      local got
      local client = pair(function(_, stream)
        got = stream:read_bytes(100, true)
        stream:write("ok\n")
      end)
      client:write("abc")
      assert.equal("ok\n", client:read_until("\n"))
      assert.equal("abc", got)
    end))

    it("reads 16 MiB at once", async(function()
      local n = 16 * 1024 * 1024
      local client = pair(function(_, stream)
        local data = stream:read_bytes(n)
        stream:write(#data .. "\n")
      end)
      client:write(("z"):rep(n))
      assert.equal(n .. "\n", client:read_until("\n"))
    end))

    it("gives the partial data with 'closed' at EOF", async(function()
      local result
      local client = pair(function(_, stream)
        result = {stream:read_bytes(10)}
      end)
      client:write("abc")
      client:close()
      H.wait_until(function() return result end)
      assert.same({nil, "closed", "abc"}, result)
    end))
  end)

  describe("after the peer closes", function()
    it("serves buffered data, then reports 'closed'", async(function()
      local done, got = locks.Event(), {}
      local client
      local server, port = H.serve(function(_, stream)
        done:wait()
        for i = 1, 4 do got[i] = {stream:read_until("\n")} end
        got.closed = stream:closed()
      end, {read_chunk_size = 2})
      finally(function() server:stop() end)
      client = H.connect(port)
      client:set_close_callback(function() done:set() end)
      client:write("a\nbb\nccc\n")
      client:close()
      H.wait_until(function() return got.closed ~= nil end)
      assert.same({{"a\n"}, {"bb\n"}, {"ccc\n"}, {nil, "closed", ""}, closed = true}, got)
    end))

    it("satisfies a pending read from data in two chunks then EOF", async(function()
      local result
      local client = pair(function(_, stream)
        result = {stream:read_until_close()}
      end)
      client:write("first ")
      client:flush()
      client:write("second")
      client:close()
      H.wait_until(function() return result end)
      assert.same({"first second"}, result)
    end))

    it("lets read_until_close return what was buffered when already closed", async(function()
      local result
      local client = pair(function(_, stream)
        assert.equal("x", stream:read_bytes(1))
        stream:close()
        result = {stream:read_until_close()}
      end)
      client:write("xyz")
      client:read_until_close()
      H.wait_until(function() return result end)
      assert.same({"yz"}, result)
    end))

    -- Python's client: sends argv[2], shuts down its sending half (TCP's
    -- FIN only, also over TLS: SSLSocket's shutdown would drop TLS), then
    -- prints all it gets. argv[3] "tls" with argv[4] the CA speaks TLS.
    local HALF_CLOSE = [[
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
if sys.argv[3] == "tls":
    s = ssl.create_default_context(cafile=sys.argv[4]).wrap_socket(s, server_hostname="localhost")
s.sendall(sys.argv[2].encode())
socket.socket.shutdown(s, socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(100)
    if not chunk: break
    data += chunk
sys.stdout.write(data.decode())
]]

    it("keeps a stream open for a reply written after a pause (half-close, plain and TLS)",
       async(function()
      -- the core read ahead, saw the FIN while the handler was busy, and
      -- closed the stream: the reply was lost (`nc -N` clients)
      local C = H.certs()
      for _, ssl_options in ipairs {false, {certfile = C.server.certfile, keyfile = C.server.keyfile}} do
        local result = {}
        local _, port = H.serve(function(_, stream)
          local line = stream:read_until("\n")
          ioloop.sleep(0.2) -- some work (a database, an upstream) before the reply
          result = {stream:write("reply to " .. line)}
        end, {ssl_options = ssl_options or nil})
        local mode = ssl_options and "tls" or "plain"
        assert.equal("reply to GET /\n", H.python(HALF_CLOSE, tostring(port), "GET /\n", mode, C.cafile), mode)
        assert.same({true}, result)
      end
    end))

    -- A server's stream stays open at EOF while its handler runs (above);
    -- what else it must not hold on to, found in review:
    it("runs a close callback set after the end came, or before it with data left", async(function()
      local fired = {}
      for _, case in ipairs {"after", "data first"} do
        local _, port = H.serve(function(_, stream)
          if case ~= "after" then stream:set_close_callback(function() fired[case] = true end) end
          H.wait_until(function() return stream:buffer_sizes() > 0 or case == "after" end)
          ioloop.sleep(0.2) -- the client's end arrives meanwhile
          if case == "after" then
            stream:set_close_callback(function() fired[case] = true end)
          else
            stream:read_bytes(3)
          end
          H.wait_until(function() return fired[case] end)
        end)
        local c = H.connect(port)
        if case ~= "after" then c:write("abc") end
        c:close()
      end
      H.wait_until(function() return fired.after and fired["data first"] end)
    end))

    it("closes pipes and client streams at the end: dropped, they keep no descriptor", async(function()
      local process = require "tcpserver.process"
      local function descriptors()
        local n = 0
        for _ in io.popen("ls /proc/" .. process.getpid() .. "/fd"):lines() do n = n + 1 end
        return n
      end
      local _, port = H.serve(function(_, stream) stream:write("bye\n") end)
      local before = descriptors()
      for _ = 1, 20 do
        local p = process.Subprocess({"echo", "hi"}, {stdout = "pipe", stderr = "pipe"})
        assert.equal("hi\n", p.stdout:read_until_close()) -- stderr: never read
        assert.equal(0, p:wait_for_exit())
        local c = H.connect(port)
        assert.equal("bye\n", c:read_until("\n")) -- then dropped, not closed
      end
      H.wait_until(function() return descriptors() <= before + 2 end) -- was 40 more
    end))

    it("still accepts writes until the handler reads EOF (half-close)", async(function()
      local _, port = H.serve(function(_, stream)
        while true do
          local line = stream:read_until("\n")
          if not line then break end
          stream:write(line:upper())
        end
      end)
      assert.equal("ONE\nTWO\n", H.python(HALF_CLOSE, tostring(port), "one\ntwo\n", "plain"))
    end))
  end)

  describe("write", function()
    it("accepts '' and arrays of strings", async(function()
      local client = pair(function(_, stream)
        assert.is_true(stream:write(""))
        assert.is_true(stream:write({"a", "b", "", "c\n"}))
      end)
      assert.equal("abc\n", client:read_until_close())
    end))

    it("returns nil, 'closed' on a closed stream", async(function()
      local result
      local client = pair(function(_, stream)
        stream:close()
        result = {stream:write("x")}
      end)
      client:read_until_close()
      assert.same({nil, "closed"}, result)
    end))

    it("works from a plain callback without yielding", async(function()
      local client = pair(function(_, stream)
        local done = locks.Event()
        ioloop.current():call_later(0, function()
          assert.is_true(stream:write("from callback\n"))
          done:set()
        end)
        done:wait()
      end)
      assert.equal("from callback\n", client:read_until("\n"))
    end))

    it("blocks the writer at the high-water mark until the peer reads", async(function()
      local total, chunk = 32 * 1024 * 1024, ("w"):rep(64 * 1024)
      local sstream, finished
      local client = pair(function(_, stream)
        sstream = stream
        for _ = 1, total // #chunk do assert(stream:write(chunk)) end
        assert(stream:flush())
        finished = true
      end)
      local received, max_pending = 0, 0
      while received < total do
        local data = assert(client:read_bytes(1024 * 1024))
        received = received + #data
        local _, pending = sstream:buffer_sizes()
        if pending > max_pending then max_pending = pending end
      end
      assert.equal(total, received)
      assert.is_true(max_pending <= 1024 * 1024 + #chunk, "pending " .. max_pending)
      H.wait_until(function() return finished end)
    end))

    it("closes quietly when the peer resets in the middle of a write", async(function()
      local logs, restore = H.capture_logs()
      local result
      local server, port = H.serve(function(_, stream)
        stream:write("go\n")
        local chunk = ("r"):rep(256 * 1024)
        for _ = 1, 400 do
          local ok, err = stream:write(chunk)
          if not ok then result = err break end
        end
        result = result or "wrote everything"
      end)
      reset_after_line(port)
      H.wait_until(function() return result end)
      server:stop()
      restore()
      assert.equal("closed", result)
      assert.same({}, logs)
    end))

    it("lets ten concurrent writers finish", async(function()
      local client = pair(function(_, stream)
        local done = 0
        for w = 1, 10 do
          ioloop.current():spawn(function()
            for _ = 1, 100 do assert(stream:write(("%d"):format(w):rep(1000) .. "\n")) end
            done = done + 1
          end)
        end
        H.wait_until(function() return done == 10 end)
      end)
      local lines = 0
      while client:read_until("\n") do lines = lines + 1 end
      assert.equal(1000, lines)
    end))
  end)

  describe("flush", function()
    it("waits until everything is handed to the kernel", async(function()
      local client = pair(function(_, stream)
        stream:write(("f"):rep(4 * 1024 * 1024))
        assert.is_true(stream:flush())
        local _, pending = stream:buffer_sizes()
        assert.equal(0, pending)
      end)
      assert.equal(4 * 1024 * 1024, #client:read_until_close())
    end))
  end)

  describe("settimeout", function()
    it("returns 'timeout' and leaves the stream usable", async(function()
      local result = {}
      local client = pair(function(_, stream)
        stream:settimeout(0.05)
        result[1] = {stream:read_until("\n")}
        result.closed = stream:closed()
        stream:write("go\n")
        stream:settimeout(nil)
        result[2] = {stream:read_until("\n")}
      end)
      assert.equal("go\n", client:read_until("\n"))
      client:write("late\n")
      client:read_until_close()
      assert.same({nil, "timeout"}, result[1])
      assert.is_false(result.closed)
      assert.same({"late\n"}, result[2])
    end))

    -- The timer armed for one wait stays armed past it (restarting it per
    -- wait cost two heap operations per request); the next wait must
    -- still get its own time, and none once timeouts are off.
    it("gives a wait that begins while an earlier wait's timer is armed its whole time", async(function()
      local res, loop = {}, ioloop.current()
      local client = pair(function(_, stream)
        stream:set_timeout(0.4)
        res[1] = stream:read_until("\n") -- comes 0.2 s into the 0.4 s
        local t0 = loop:time()
        res[2] = {stream:read_until("\n")}
        res.waited = loop:time() - t0
      end)
      ioloop.sleep(0.2)
      client:write("one\n")
      client:read_until_close()
      assert.same({"one\n", {nil, "timeout"}}, {res[1], res[2]})
      assert.is_true(res.waited >= 0.39, "waited " .. res.waited)
    end))

    -- Each wait has its own start. They shared one: any new wait on the
    -- stream put off the others' timeouts, for as long as waits came.
    it("times out a waiting write while reads on the stream keep coming", async(function()
      local res
      local client = pair(function(_, stream)
        stream:set_timeout(0.3)
        ioloop.current():spawn(function()
          local big, ok, err = ("x"):rep(1024 * 1024), true, nil
          while ok do ok, err = stream:write(big) end -- the client reads nothing
          res = {ok, err}
        end)
        while not res and stream:read_until("\n") do end -- a line every 0.1 s
      end)
      for _ = 1, 50 do -- 5 s at most
        if res then break end
        ioloop.sleep(0.1)
        client:write("line\n")
      end
      assert.same({nil, "timeout"}, res)
      client:close()
    end))

    it("times out a waiting read while writes on the stream keep waiting", async(function()
      local res, stop
      local client = pair(function(_, stream)
        stream:set_timeout(0.3)
        ioloop.current():spawn(function()
          local big = ("x"):rep(1024 * 1024)
          while not stop and stream:write(big) do end -- waits, the client reads, again
        end)
        res = {stream:read_until("\n")} -- no line comes
        stop = true
      end)
      local deadline = ioloop.current():time() + 5
      while not res and ioloop.current():time() < deadline do
        client:read_bytes(65536, true)
      end
      assert.same({nil, "timeout"}, res)
      client:close()
    end))

    it("refuses a negative or NaN timeout, saying so", async(function()
      local errs = {}
      local client = pair(function(_, stream)
        for _, bad in ipairs {-1, 0 / 0} do
          errs[#errs + 1] = select(2, pcall(stream.set_timeout, stream, bad))
        end
        stream:write("done\n")
      end)
      assert.equal("done\n", client:read_until("\n"))
      for _, e in ipairs(errs) do assert.matches("set_timeout: seconds must be 0 or more", e) end
      assert.equal(2, #errs)
      client:close()
    end))

    it("times out no wait after timeouts are turned off", async(function()
      local res = {}
      local client = pair(function(_, stream)
        stream:set_timeout(0.1)
        res[1] = stream:read_until("\n")
        stream:set_timeout(0)
        res[2] = {stream:read_until("\n")} -- past the 0.1 s armed for the first
        stream:write("done\n")
      end)
      client:write("one\n")
      ioloop.sleep(0.3)
      client:write("two\n")
      assert.equal("done\n", client:read_until("\n"))
      assert.same({"one\n", {"two\n"}}, res)
    end))

    it("applies idle_timeout to every stream of a server", async(function()
      local result
      local client = pair(function(_, stream)
        result = {stream:read_bytes(1)}
      end, {idle_timeout = 0.05})
      client:read_until_close()
      assert.same({nil, "timeout"}, result)
    end))
  end)

  describe("close", function()
    it("runs the close callback when the peer closes while idle", async(function()
      local closed = locks.Event()
      local client = pair(function(_, stream)
        stream:set_close_callback(function() closed:set() end)
        closed:wait()
      end)
      client:close()
      assert.is_true(closed:wait(5))
    end))

    it("runs the close callback while a read is pending", async(function()
      local calls = 0
      local closed = locks.Event()
      local result
      local client = pair(function(_, stream)
        stream:set_close_callback(function() calls = calls + 1; closed:set() end)
        result = {stream:read_until("\n")}
      end)
      client:write("partial")
      client:close()
      assert.is_true(closed:wait(5))
      H.wait_until(function() return result end)
      assert.same({nil, "closed", "partial"}, result)
      assert.equal(1, calls)
    end))

    it("lets a reader woken by the close replace the close callback", async(function()
      -- The reader wakes inside the close, before the callback would run:
      -- what it sets then is what counts.
      local calls, done = {}, locks.Event()
      local server, port = H.serve(function(_, stream)
        stream:set_close_callback(function() calls[#calls + 1] = "first" end)
        stream:write("go\n")
        assert.is_nil(stream:read_until("\n")) -- the peer resets
        stream:set_close_callback(function() calls[#calls + 1] = "second" end)
        done:set()
      end)
      finally(function() server:stop() end)
      reset_after_line(port)
      assert.is_true(done:wait(5))
      assert.same({"second"}, calls)
    end))

    it("wakes a reader in another task with 'closed'", async(function()
      local result
      local client = pair(function(_, stream)
        local done = locks.Event()
        ioloop.current():spawn(function()
          result = {stream:read_until("\n")}
          done:set()
        end)
        stream:close()
        done:wait()
      end)
      client:read_until_close()
      assert.same({nil, "closed", ""}, result)
    end))

    it("works as a to-be-closed variable", async(function()
      local sstream
      local client = pair(function(_, stream)
        local s <close> = stream
        sstream = s
      end)
      client:read_until_close()
      assert.is_true(sstream:closed())
    end))
  end)

  it("gives peer and local addresses", async(function()
    local peer, sock
    local client = pair(function(_, stream)
      peer = {stream:getpeername()}
      sock = {stream:getsockname()}
      stream:set_nodelay(true)
    end)
    local _, cport = client:getsockname()
    client:read_until_close()
    assert.same({"127.0.0.1", cport, "inet"}, peer)
    assert.equal("127.0.0.1", sock[1])
  end))

  it("raises when a read is made outside a task", function()
    local server, port = H.serve(function() end)
    local client
    ioloop.current():run_sync(function() client = H.connect(port) end)
    assert.has_error(function() client:read_until("\n") end)
    local ok, err = pcall(client.read_until, client, "\n")
    assert.is_false(ok)
    assert.matches("coroutine run by the loop", err)
    client:close()
    server:stop()
  end)
end)

-- Defects found by Tornado's ported tests and real clients (issue 10); each
-- of these failed before its fix.
describe("IOStream regressions", function()
  it("lets the loop turn between full 64 KiB reads that wake a reader", async(function()
    -- libuv reads on while a read fills its buffer, up to 2 MiB at a time:
    -- one sender's burst ran its handler that long before any other
    -- callback (a chat room dropped its fast readers as too slow)
    local total, got, most = 16 * 1024 * 1024, 0, 0
    local _, port = H.serve(function(_, stream)
      local asked -- bytes read when a callback was last added
      while got < total do
        local data = stream:read_bytes(65536, true)
        if not data then return end
        got = got + #data
        data:upper() -- some work per chunk: meanwhile the sender fills the socket
        if not asked then -- how much more is read before the callback runs?
          asked = got
          H.loop:add_callback(function() most, asked = math.max(most, got - asked), nil end)
        end
      end
      stream:write("done\n")
    end)
    local out, status = H.python([[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"x" * int(sys.argv[2]))
print(s.makefile().readline().strip())
]], tostring(port), tostring(total))
    assert.same({"done\n", 0}, {out, status})
    -- at most one more read before the callback's turn (there were up to 32)
    assert.is_true(most <= 65536, "read before a callback ran: " .. most)
  end))

  it("resumes reading for a request made past the read high-water mark", async(function()
    local got
    local n = 64 * 1024
    local client = pair(function(_, stream)
      -- read_chunk_size 1 KiB: reading stops at 4 KiB buffered
      H.wait_until(function() return stream:buffer_sizes() >= 4096 end)
      got = stream:read_bytes(n)
      stream:write("done\n")
    end, {read_chunk_size = 1024})
    client:write(("x"):rep(n))
    assert.equal("done\n", client:read_until("\n"))
    assert.equal(n, #got)
    client:close()
  end))

  it("queues concurrent writers past the high-water mark, in order", async(function()
    local errs, order = {}, {}
    local chunk = ("w"):rep(4 * 1024 * 1024)
    local released = locks.Event()
    local client = pair(function(_, stream)
      local done = 0
      for i = 1, 3 do
        ioloop.current():spawn(function()
          local ok, err = pcall(stream.write, stream, chunk:sub(1, -2) .. i)
          if not ok then errs[#errs + 1] = err end
          order[#order + 1] = i
          done = done + 1
          if done == 3 then released:set() end
        end)
      end
      released:wait()
      stream:write("end\n")
    end)
    local all = assert(client:read_until("end\n"))
    assert.same({}, errs)
    assert.same({1, 2, 3}, order)
    assert.equal(3 * #chunk + 4, #all)
    assert.equal("1", all:sub(#chunk, #chunk))
    assert.equal("2", all:sub(2 * #chunk, 2 * #chunk))
    assert.equal("3", all:sub(3 * #chunk, 3 * #chunk))
    client:close()
  end))

  it("treats a huge timeout as none", async(function()
    for _, t in ipairs {math.huge, 1e17} do
      local res
      local client = pair(function(_, stream)
        stream:settimeout(t)
        res = {stream:read_until("\n")}
      end)
      client:write("late\n")
      H.wait_until(function() return res end)
      assert.same({"late\n"}, res)
      client:close()
    end
    local res
    local client = pair(function(_, stream)
      res = {stream:read_until("\n")}
    end, {idle_timeout = math.huge})
    client:write("idle\n")
    H.wait_until(function() return res end)
    assert.same({"idle\n"}, res)
    client:close()
  end))

  it("gives the others a turn on a bare coroutine.yield and resumes the task", async(function()
    local after
    local server, port = H.serve(function(_, stream)
      coroutine.yield()
      after = true
      stream:write("resumed\n")
    end, {max_connections = 1})
    finally(function() server:stop() end)
    for _ = 1, 3 do
      local c = H.connect(port)
      assert.equal("resumed\n", c:read_until("\n"))
      c:close()
    end
    assert.is_true(after)
  end))
end)

describe("closing with unread bytes", function()
  it("delivers what was written before close() although the peer's bytes were never read",
     async(function()
    -- close() of a socket with unread bytes sends a reset (Linux), which
    -- dropped the unsent rest: a TLS client lost most of 1 MiB that way,
    -- to a session ticket it had not read
    local got
    local server, port = H.serve(function(_, stream)
      stream:write(("s"):rep(288 * 1024)) -- the client's 256 KiB mark and 32 KiB more
      got = stream:read_until_close()
    end)
    finally(function() server:stop() end)
    local client = H.connect(port)
    -- the client never reads: past its 256 KiB mark the server's last
    -- 32 KiB wait in its socket
    H.wait_until(function() return client:buffer_sizes() >= 256 * 1024 end)
    client:write(("c"):rep(1024 * 1024))
    assert(client:flush())
    client:close()
    H.wait_until(function() return got end)
    assert.equal(1024 * 1024, #got)
  end))
end)

describe("the read budget", function()
  local loop = ioloop.current()
  local saved = loop:read_budget()
  after_each(function() loop:read_budget(saved) end)

  it("refuses the largest buffers past it and serves the small ones", async(function()
    local logs, restore = H.capture_logs()
    finally(restore)
    loop:read_budget(1024 * 1024)
    local results = {}
    local client_big = {}
    local server, port = H.serve(function(_, stream)
      while true do
        local line, err = stream:read_until("\n")
        if not line then
          results[#results + 1] = err
          return
        end
        stream:write(#line .. "\n")
      end
    end)
    finally(function() server:stop() end)
    local small = H.connect(port)
    small:write("hello\n")
    assert.equal("6\n", small:read_until("\n"))
    for i = 1, 3 do
      client_big[i] = H.connect(port)
      client_big[i]:write(("x"):rep(2 * 1024 * 1024)) -- no end of line
    end
    H.wait_until(function() return #results == 3 end)
    assert.same({"too large", "too large", "too large"}, results)
    for i = 1, 3 do
      assert.equal("", client_big[i]:read_until_close()) -- closed by the server
    end
    small:write("still served\n")
    assert.equal("13\n", small:read_until("\n"))
    assert.matches("warning: read buffers over the budget", logs[1])
    small:close()
    collectgarbage()
    collectgarbage()
    local _, held = loop:read_budget()
    assert.is_true(held < 1024 * 1024)
  end))

  it("rejects a budget that is not a positive integer", function()
    assert.has_error(function() loop:read_budget(0) end, "read_budget: bytes must be a positive integer")
    assert.has_error(function() loop:read_budget(1.5) end, "read_budget: bytes must be a positive integer")
  end)
end)

describe("read_until_pattern", function()
  it("reads up to the end of the first match, across reads", async(function()
    local got = {}
    local client = pair(function(_, stream)
      got[1] = stream:read_until_pattern("\r?\n")
      got[2] = stream:read_until_pattern("%d+;")
      got[3] = {stream:read_until_pattern("END")}
    end, {read_chunk_size = 2})
    client:write("first\r\nabc 123;")
    client:write("rest without the word")
    client:close()
    H.wait_until(function() return got[3] end)
    assert.same({"first\r\n", "abc 123;", {nil, "closed", "rest without the word"}}, got)
  end))

  it("fails with 'too large' and closes past max_bytes, buffered or not", async(function()
    local res = {}
    local client = pair(function(_, stream)
      res[1] = {stream:read_until_pattern("x", 3)}
      res[2] = stream:closed()
    end)
    client:write("abcdx")
    H.wait_until(function() return res[2] ~= nil end)
    assert.same({{nil, "too large"}, true}, res)
    client:close()
  end))

  it("raises for a bad pattern or max_bytes, and for a second reader", async(function()
    local errs = {}
    local client = pair(function(_, stream)
      errs[1] = select(2, pcall(stream.read_until_pattern, stream, ""))
      errs[2] = select(2, pcall(stream.read_until_pattern, stream, "x", 0))
      ioloop.current():spawn(function() stream:read_until_pattern("never") end)
      errs[3] = select(2, pcall(stream.read_until_pattern, stream, "x"))
    end)
    H.wait_until(function() return errs[3] end)
    client:close()
    assert.matches("non%-empty string expected", errs[1])
    assert.matches("positive integer expected", errs[2])
    assert.matches("already reading", errs[3])
  end))
end)

describe("writers waiting when the stream closes", function()
  local big = ("w"):rep(8 * 1024 * 1024)

  it("fail with 'closed' at once when a task closes the stream", async(function()
    local res
    local client = pair(function(_, stream)
      ioloop.current():spawn(function() res = {stream:write(big)} end)
      assert.is_nil(res) -- waiting: the client does not read
      stream:close()
      H.wait_until(function() return res end)
    end)
    H.wait_until(function() return res end, 3)
    assert.same({nil, "closed"}, res)
    client:close()
  end))

  it("fail when the peer resets", async(function()
    local res
    local server, port = H.serve(function(_, stream)
      stream:write("go\n")
      ioloop.current():spawn(function() res = {stream:write(big)} end)
      H.wait_until(function() return res end)
    end)
    finally(function() server:stop() end)
    reset_after_line(port)
    H.wait_until(function() return res end, 3)
    assert.same({nil, "closed"}, res)
  end))
end)

describe("review findings", function()
  it("keeps a task reading on the stream alive after the handler raised", async(function()
    local got
    local Server = require("tcpserver").TCPServer:extend({handle_stream = function(_, stream)
      ioloop.current():spawn(function() got = {stream:read_until("\n")} end)
      error("boom")
    end})
    -- on_error collects: the reading task must still be anchored
    local server = Server({on_error = function() collectgarbage(); collectgarbage() end})
    local port = server:listen(0, "127.0.0.1")
    finally(function() server:stop() end)
    local c = H.connect(port)
    c:write("partial")
    c:read_until_close()
    H.wait_until(function() return got end)
    assert.same({nil, "closed"}, {got[1], got[2]}) -- and no crash

  end))

  it("times out only the waits that were waiting when the timer fired", async(function()
    local timed_out, res = locks.Event(), nil
    local client = pair(function(_, stream)
      stream:set_timeout(0.3)
      local ok, err = stream:write(("x"):rep(8 * 1024 * 1024)) -- the client does not read
      timed_out:set()
      res = {ok, err, stream:read_until("\n")}
    end)
    timed_out:wait()
    client:write("hello\n")
    H.wait_until(function() return res end)
    assert.same({nil, "timeout", "hello\n"}, res)
    client:close()
  end))

  it("lets only core.resume wake what core.park parked", async(function()
    local core = require "tcpserver.core"
    local sleeper
    ioloop.current():spawn(function()
      sleeper = coroutine.running()
      ioloop.sleep(0.01)
    end)
    local ok, err = pcall(core.resume, sleeper)
    assert.is_false(ok)
    assert.matches("not parked by core.park", err)
  end))
end)

describe("hardening round 3", function()
  -- Defect 5: a wait that cannot yield (inside table.sort's comparator, a
  -- gsub callback) raised from lua_yield after it had registered, and the
  -- registration lived on.
  local NOT_HERE = "cannot wait here: attempt to yield across a C%-call boundary"

  it("refuses a read that cannot yield, leaving nothing registered", async(function()
    local tried, errs, result = locks.Event(), {}, nil
    local client = pair(function(_, stream)
      local ok, err = pcall(table.sort, {1, 2}, function() return stream:read_until("\n") end)
      errs[1] = not ok and err
      ok, err = pcall(string.gsub, "x", "x", function() return stream:read_bytes(3) end)
      errs[2] = not ok and err
      tried:set()
      -- with the read left registered, the line woke this sleep
      result = {ioloop.sleep(0.2)}
      result[#result + 1] = stream:read_until("\n")
      stream:write("done\n")
    end)
    tried:wait()
    client:write("line\n")
    assert.equal("done\n", client:read_until("\n"))
    assert.matches("read: " .. NOT_HERE, errs[1])
    assert.matches("read: " .. NOT_HERE, errs[2])
    assert.same({true, "line\n"}, result)
    client:close()
  end))

  it("refuses a sleep or an Event wait that cannot yield, leaving no timer", async(function()
    local errs, result = {}, nil
    local client = pair(function(_, stream)
      local ok, err = pcall(table.sort, {1, 2}, function() return ioloop.sleep(0.01) end)
      errs[1] = not ok and err
      ok, err = pcall(table.sort, {1, 2}, function() return locks.Event():wait(0.01) end)
      errs[2] = not ok and err
      stream:write("tried\n")
      -- the sleep's timer, left running, woke this read with true
      result = stream:read_until("\n")
      stream:write("done\n")
    end)
    assert.equal("tried\n", client:read_until("\n"))
    ioloop.sleep(0.1) -- the left-over timers fired by now (the subject here)
    client:write("line\n")
    assert.equal("done\n", client:read_until("\n"))
    assert.matches("sleep: " .. NOT_HERE, errs[1])
    assert.matches("Event:wait: " .. NOT_HERE, errs[2])
    assert.equal("line\n", result)
    client:close()
  end))

  -- Defect 6: an array with a bad item raised after the items before it
  -- were queued.
  it("queues none of a write({...}) that raises on a bad item", async(function()
    local client = pair(function(_, stream)
      local ok, err = pcall(stream.write, stream, {"PARTIAL-", "more-", 42})
      assert(not ok and err:find("item 3 is not a string"), err)
      stream:write("reply\n")
    end)
    assert.equal("reply\n", client:read_until("\n"))
    client:close()
  end))

  -- Defect 4: a batch past 2 GiB in all returned "too large" with its
  -- first items queued but never flushed; the next reply came out first.
  it("takes none of a write({...}) past 2 GiB in all, and the stream goes on", async(function()
    local big = ("x"):rep(128 * 1024 * 1024)
    local res
    local client = pair(function(_, stream)
      stream:write("first\n")
      local batch = {}
      for i = 1, 17 do batch[i] = big end -- 2,176 MiB, past INT_MAX
      res = {stream:write(batch)}
      res[3] = select(2, stream:buffer_sizes()) -- "first\n" only
      stream:write("second\n")
    end)
    assert.equal("first\n", client:read_until("\n"))
    assert.equal("second\n", client:read_until("\n"))
    assert.same({nil, "too large", 6}, res)
    client:close()
  end, 60)) -- a 128 MiB string takes seconds to make under valgrind
end)

-- Defect 8: alloc_cb offered the buffer's whole spare capacity, so a
-- handler that did not read held up to 488 KiB (512 KiB allocated; TLS
-- 272 KiB) against the documented 4 x read_chunk_size.
describe("the read high-water mark", function()
  local tcpclient = require "tcpserver.tcpclient"
  local CHUNK = 4096
  local MARK = 4 * CHUNK

  -- A server whose handler reads nothing until `go` is set, then the
  -- client's whole stream; the patterns send in bursts of these sizes,
  -- each taken in (server side) before the next, the last one past the mark.
  local function check(tls, bursts, chunk)
    local go, server_stream, got = locks.Event(), nil, nil
    local opts = {read_chunk_size = chunk or CHUNK}
    local mark = 4 * opts.read_chunk_size
    if tls then
      local C = H.certs()
      opts.ssl_options = {certfile = C.server.certfile, keyfile = C.server.keyfile}
    end
    local server, port = H.serve(function(_, stream)
      server_stream = stream
      go:wait()
      got = stream:read_until_close()
    end, opts)
    finally(function() server:stop() end)
    local client = assert(tcpclient.connect("127.0.0.1", port, tls and {
      ssl_options = {cafile = H.certs().cafile}} or nil))
    H.wait_until(function() return server_stream end)
    local sent, writing = 0, 0
    for i, n in ipairs(bursts) do
      writing = writing + 1
      ioloop.current():spawn_callback(function() -- may wait until the server reads
        client:write(("%d"):format(i % 10):rep(n))
        assert(client:flush())
        writing = writing - 1
      end)
      sent = sent + n
      local want = math.min(sent, mark)
      -- the server stops reading at the mark: what it holds then stays
      H.wait_until(function() return server_stream:buffer_sizes() >= want end)
      local buffered, _, allocated = server_stream:buffer_sizes()
      assert.is_true(buffered <= mark, ("burst %d: %d buffered, mark %d"):format(i, buffered, mark))
      assert.is_true(allocated <= mark, ("burst %d: %d allocated, mark %d"):format(i, allocated, mark))
    end
    go:set()
    H.wait_until(function() return writing == 0 end)
    client:close()
    H.wait_until(function() return got end)
    assert.equal(sent, #got)
  end

  for _, tls in ipairs {false, true} do
    local kind = tls and "TLS" or "plain"
    it("holds on a " .. kind .. " stream whose peer sends without a pause", async(function()
      check(tls, {1024 * 1024})
      check(tls, {4 * 1024 * 1024}, 64 * 1024) -- the defaults: 256 KiB
    end))

    it("holds on a " .. kind .. " stream whose peer pauses between bursts", async(function()
      check(tls, {10000, 5000, 1, 1300, 100000})
      check(tls, {100000, 100000, 1000000}, 64 * 1024)
    end))
  end

  it("lets a reader take a line longer than the mark, then holds again", async(function()
    local lines, holding = {}, locks.Event()
    local server_stream
    local server, port = H.serve(function(_, stream)
      server_stream = stream
      lines[1] = stream:read_until("\n")
      holding:wait()
    end, {read_chunk_size = CHUNK})
    finally(function() server:stop() end)
    local client = H.connect(port)
    client:write(("x"):rep(10 * MARK) .. "\n" .. ("y"):rep(10 * MARK))
    H.wait_until(function() return lines[1] and server_stream:buffer_sizes() >= MARK end)
    assert.equal(10 * MARK + 1, #lines[1])
    assert.is_true(server_stream:buffer_sizes() <= MARK)
    holding:set()
    client:close()
  end))
end)

describe("IOStream additions", function()
  it("shutdown('send') ends this side's sending: the peer reads the end, this side reads on",
     async(function()
    local res = {}
    local server, port = H.serve(function(_, stream)
      stream:write("hello")
      res.shut = {stream:shutdown("send")}
      res.write = {stream:write("more")}
      res.read = stream:read_until_close()
    end)
    finally(function() server:stop() end)
    local out = H.python([[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
data = b""
while True:
    chunk = s.recv(100)
    if not chunk: break
    data += chunk
s.sendall(b"after the end\n")
s.shutdown(socket.SHUT_WR)
print(data.decode())
]], tostring(port))
    assert.equal("hello\n", out)
    H.wait_until(function() return res.read end)
    assert.same({true}, res.shut)
    assert.same({nil, "closed"}, res.write)
    assert.equal("after the end\n", res.read)
  end))

  it("read_until with 'keep' fails past max_bytes without closing; skip_until drops the rest",
     async(function()
    local res = {}
    local server, port = H.serve(function(_, stream)
      res.long = {stream:read_until("\n", 10, "keep")}
      res.open = not stream:closed()
      stream:write("500 line too long\r\n") -- a refusal of the protocol's own
      res.skipped = stream:skip_until("\n")
      res.next = stream:read_until("\n", 10, "keep")
    end)
    finally(function() server:stop() end)
    local c = H.connect(port)
    c:write(("x"):rep(100000) .. "\nok\n")
    assert.equal("500 line too long\r\n", c:read_until("\n"))
    H.wait_until(function() return res.next end)
    assert.same({nil, "too large", ("x"):rep(10)}, res.long)
    assert.is_true(res.open)
    assert.equal(100000 - 10 + 1, res.skipped)
    assert.equal("ok\n", res.next)
    c:close()
    local s2 = H.connect(port)
    s2:close()
    assert.has_error(function()
      local st = H.connect(port)
      st:read_until("\n", nil, "keep")
    end)
  end))

  it("peek(n) gives the next n bytes and leaves them unread", async(function()
    local res = {}
    local server, port = H.serve(function(_, stream)
      res.peek = stream:peek(3)
      res.read = stream:read_bytes(6)
      res.at_end = {stream:peek(10)}
    end)
    finally(function() server:stop() end)
    local c = H.connect(port)
    c:write("abcdefgh")
    c:close()
    H.wait_until(function() return res.at_end end)
    assert.equal("abc", res.peek)
    assert.equal("abcdef", res.read)
    assert.same({nil, "closed", "gh"}, res.at_end)
  end))

  it("settimeouts sets a read's and a write's limit apart", async(function()
    local res = {}
    local c, server = pair(function(_, stream)
      stream:settimeouts(nil, 0.05, nil) -- writes only
      res.write = {stream:write(("w"):rep(8 * 1024 * 1024))} -- the peer does not read
      stream:settimeouts(nil, nil, 0.05) -- reads only
      res.read = {stream:read_until("\n")}
      stream:settimeouts(1, 0, 0)
      res.done = true
    end)
    H.wait_until(function() return res.done end)
    assert.same({nil, "timeout"}, res.write)
    assert.same({nil, "timeout"}, res.read)
    c:close()
    server:stop()
  end))

  it("setoption and getoption take LuaSocket's names", async(function()
    local c, server = pair(function(_, stream) stream:read_until_close() end)
    assert.is_true(c:setoption("keepalive", true))
    assert.is_true(c:getoption("keepalive"))
    assert.is_true(c:setoption("tcp-nodelay", false))
    assert.is_false(c:getoption("tcp-nodelay"))
    assert.is_true(c:setoption("linger", {on = true, timeout = 3}))
    assert.same({on = true, timeout = 3}, c:getoption("linger"))
    assert.is_true(c:setoption("reuseaddr", true))
    assert.is_true(c:getoption("reuseaddr"))
    assert.has_error(function() c:setoption("colour", true) end)
    c:close()
    assert.same({nil, "closed"}, {c:getoption("keepalive")})
    server:stop()
  end))
end)
