-- Port of Tornado's tornado/test/iostream_test.py (Tornado 6.x, master).
-- Tornado's class names are the describe() names and its test names the
-- it() names. Tornado raises StreamClosedError / UnsatisfiableReadError;
-- here reads return nil, "closed" / nil, "too large" (DESIGN.md). A read
-- or write that Tornado starts without awaiting runs in a task of its own
-- (T.future, T.go). The mixins run over the same pairs as in Tornado: TCP,
-- TLS with option tables, TLS with contexts, and pipes.
--
-- Skipped, and why:
--   TestIOStreamWebMixin.test_write_while_connecting: connect() returns a
--     connected stream; there is no stream to write to while connecting.
--   TestReadWriteMixin.test_read_until_regex_max_bytes{,_inline,_ignores_extra}:
--     no read_until_regex in the API.
--   TestReadWriteMixin.test_read_into{,_partial,_zero_bytes}: no read_into
--     (Lua strings are immutable; there are no user buffers to fill).
--     test_many_mixed_reads is kept, mixing read_bytes with partial reads.
--   TestIOStreamMixin.test_read_until_close_with_error,
--     test_inline_read_error, test_async_read_error_logging: they inject
--     errors with mock.patch or os.close on the stream's fd; Lua never sees
--     a stream's fd.
--   TestPipeIOStream: the mixin tests that pass stream options
--     (test_close_buffered_data, test_small_reads_from_large_buffer,
--     test_small_read_untils_from_large_buffer, test_flow_control): a
--     Subprocess pipe takes no read_chunk_size / max_buffer_size.
--   TestIOStreamStartTLS.test_typed_memoryview: Python's memoryview item
--     sizes; Lua strings are bytes.
--   TestStreamBuffer: tests the private _StreamBuffer class.
-- Added (not in Tornado; each found a core defect): "test_future_close_callback
-- (data and close together)", the same test with the data and the close sent
-- at once; "test_future_write (closed while writers wait)" and "(peer closes
-- while writers wait)", test_future_write's "never orphaned" when the stream
-- closes under waiting writers.
-- Translated: test_write_memoryview writes an array of strings (the API's
-- other buffer type); test_gaierror uses a name that does not resolve
-- instead of a mocked socket.connect; TestIOStreamCheckHostname's
-- test_check_disabled uses verify = "none" (the API has no switch for the
-- host name check alone); the web mixin's HTTP server is a TCPServer that
-- answers like HelloHandler, and fetch() is Python's urllib.
local H = require "spec.helper"
local T = require "spec.tornado.util"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local ssl = require "tcpserver.ssl"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async
local MB = 1024 * 1024

-- Tests that fail because of a known core defect (being fixed in main):
-- they still run; a failure is pending() (with the error), a pass is a
-- failure asking to remove the entry. Keyed by "<describe> <it>".
-- Empty now: the defects these ports found (writers left waiting or told
-- true when the stream closed under them, a TLS close that came with data
-- going unnoticed) are fixed in the core, each with a spec of its own.
local KNOWN_FAIL = {}

local known = T.known_failures(KNOWN_FAIL, function(msg) pending(msg) end)

-- A port that refuses connections (Tornado's refusing_port).
local function refusing_port()
  local sock, port = require("tcpserver.testing").bind_unused_port()
  sock:close()
  return port
end

-- TestReadWriteMixin: one stream reads (rs), the other writes (ws).
local function read_write_mixin(kind)
  local make = kind.make
  local function test(name, fn, needs_options)
    if needs_options and not kind.options then return end
    it(name, async(function() known(kind.name .. " " .. name, fn) end))
  end

  test("test_write_zero_bytes", function()
    local rs, ws = make()
    assert.is_true(ws:write(""))
    assert.is_true(ws:flush())
    -- The stream still works after the empty write.
    ws:write("x")
    assert.equal("x", rs:read_bytes(1))
  end)

  test("test_future_delayed_close_callback", function()
    local rs, ws = make()
    ws:write("12")
    local chunks = {}
    chunks[1] = rs:read_bytes(1)
    ws:close()
    chunks[2] = rs:read_bytes(1)
    assert.same({"1", "2"}, chunks)
  end)

  test("test_close_buffered_data", function()
    -- The data waits in the kernel's buffers, not the stream's: the close
    -- must not show before it is drained (read_chunk_size below the
    -- kernel's buffer).
    local rs, ws = make({read_chunk_size = 256})
    ws:write(("A"):rep(512))
    assert.equal(("A"):rep(256), rs:read_bytes(256))
    ws:close()
    -- As Tornado: let the FIN reach rs's side. No event says when it has;
    -- the test passes either way if the stream is right.
    ioloop.sleep(0.01)
    assert.equal(("A"):rep(256), rs:read_bytes(256))
  end, true)

  test("test_read_until_close_after_close", function()
    local rs, ws = make()
    ws:write("1234")
    assert.equal("1", rs:read_bytes(1))
    ws:close()
    assert.equal("234", rs:read_until_close())
  end)

  test("test_large_read_until", function()
    -- read_until used to rescan the buffer: 4 MiB took 8 s in Tornado.
    local rs, ws = make()
    local NUM_KB = 4096
    T.go(function()
      local kb = ("A"):rep(1024)
      for _ = 1, NUM_KB do ws:write(kb) end
      ws:write("\r\n")
    end)
    local data = assert(rs:read_until("\r\n"))
    assert.equal(NUM_KB * 1024 + 2, #data)
  end)

  test("test_read_until_with_close_after_second_packet", function()
    -- Tornado #2717: the data comes in two chunks, the second one smaller,
    -- and the close comes with it.
    local rs, ws = make()
    local rf = T.future(rs.read_until, rs, "done")
    ws:write(("x"):rep(2048))
    assert.is_true(ws:flush())
    ws:write("done")
    ws:close()
    assert.equal(("x"):rep(2048) .. "done", rf:result())
  end)

  test("test_read_until_unsatisfied_after_close", function()
    -- A close while reading is "closed", not "too large" (which only byte
    -- limits give).
    local rs, ws = make()
    local rf = T.future(rs.read_until, rs, "done")
    ws:write(("x"):rep(2048))
    assert.is_true(ws:flush())
    ws:write("foo")
    ws:close()
    assert.same({nil, "closed", ("x"):rep(2048) .. "foo"}, {rf:result()})
  end)

  test("test_close_callback_with_pending_read", function()
    local OK = "OK\r\n"
    local rs, ws = make()
    local event = locks.Event()
    rs:set_close_callback(function() event:set() end)
    ws:write(OK)
    assert.equal(OK, rs:read_until("\r\n"))
    ws:close()
    local rf = T.future(rs.read_until, rs, "\r\n")
    assert.is_true(event:wait(5))
    assert.same({nil, "closed", ""}, {rf:result()})
  end)

  test("test_future_close_callback", function()
    local rs, ws = make()
    local closed = false
    local cond = locks.Event()
    rs:set_close_callback(function()
      closed = true
      cond:set()
    end)
    ws:write("a")
    assert.equal("a", rs:read_bytes(1))
    assert.is_false(closed)
    ws:close()
    assert.is_true(cond:wait(5))
    assert.is_true(closed)
  end)

  -- Not in Tornado: test_future_close_callback with the data and the close
  -- sent together (one segment), the read pending when they arrive.
  test("test_future_close_callback (data and close together)", function()
    local rs, ws = make()
    local closed = locks.Event()
    rs:set_close_callback(function() closed:set() end)
    local fut = T.future(rs.read_bytes, rs, 1)
    ws:write("a")
    ws:close()
    assert.equal("a", fut:result())
    assert.is_true(closed:wait(1), "the close callback did not run")
    assert.is_true(rs:closed())
  end)

  test("test_write_memoryview", function()
    local rs, ws = make()
    local fut = T.future(rs.read_bytes, rs, 4)
    assert.is_true(ws:write({"he", "llo"}))
    assert.equal("hell", fut:result())
  end)

  test("test_read_bytes_partial", function()
    local rs, ws = make()
    -- More than is available, with partial.
    local fut = T.future(rs.read_bytes, rs, 50, true)
    ws:write("hello")
    assert.equal("hello", fut:result())
    -- Less than is available: n is still respected.
    fut = T.future(rs.read_bytes, rs, 3, true)
    ws:write("world")
    assert.equal("wor", fut:result())
    -- A partial read never returns "", but read_bytes(0) does.
    assert.equal("", rs:read_bytes(0, true))
    assert.equal("ld", rs:read_bytes(2))
  end)

  test("test_read_until_max_bytes", function()
    local rs, ws = make()
    local closed = locks.Event()
    rs:set_close_callback(function() closed:set() end)
    -- Extra room under the limit.
    local fut = T.future(rs.read_until, rs, "def", 50)
    ws:write("abcdef")
    assert.equal("abcdef", fut:result())
    -- Just enough space.
    fut = T.future(rs.read_until, rs, "def", 6)
    ws:write("abcdef")
    assert.equal("abcdef", fut:result())
    -- Not enough space, known only once the data is there: the stream closes.
    fut = T.future(rs.read_until, rs, "def", 5)
    ws:write("123456")
    assert.is_true(closed:wait(5))
    assert.same({nil, "too large"}, {fut:result()})
    assert.is_true(rs:closed())
  end)

  test("test_read_until_max_bytes_inline", function()
    -- As above, but the data is buffered before the read starts.
    local rs, ws = make()
    local closed = locks.Event()
    rs:set_close_callback(function() closed:set() end)
    ws:write("123456")
    H.wait_until(function() return rs:buffer_sizes() >= 6 end)
    assert.same({nil, "too large"}, {rs:read_until("def", 5)})
    assert.is_true(closed:wait(5))
  end)

  test("test_read_until_max_bytes_ignores_extra", function()
    -- The delimiter arrives in the packet that goes past the limit: still
    -- not found within max_bytes.
    local rs, ws = make()
    local closed = locks.Event()
    rs:set_close_callback(function() closed:set() end)
    ws:write("abcdef")
    assert.same({nil, "too large"}, {rs:read_until("def", 5)})
    assert.is_true(closed:wait(5))
  end)

  test("test_small_reads_from_large_buffer", function()
    -- 10 KiB buffer, 100 KiB to read in 1 KiB reads: the buffer must not
    -- be filled eagerly past its limit.
    local rs, ws = make({max_buffer_size = 10 * 1024})
    ws:write(("a"):rep(1024 * 100))
    for _ = 1, 100 do
      assert.equal(("a"):rep(1024), rs:read_bytes(1024))
    end
  end, true)

  test("test_small_read_untils_from_large_buffer", function()
    local rs, ws = make({max_buffer_size = 10 * 1024})
    local line = ("a"):rep(1023) .. "\n"
    ws:write(line:rep(100))
    for _ = 1, 100 do
      assert.equal(line, rs:read_until("\n", 4096))
    end
  end, true)

  test("test_flow_control", function()
    local rs, ws = make({max_buffer_size = 5 * MB})
    -- The client writes more than rs will buffer.
    T.go(function() ws:write(("a"):rep(10 * MB)) end)
    assert.equal(MB, #assert(rs:read_bytes(MB)))
    -- Tornado sleeps 0.1 s here; the event to wait for is the writer being
    -- held back: bytes left in its own buffer (the kernel's are full).
    H.wait_until(function() return select(2, ws:buffer_sizes()) > 0 end)
    assert.is_true(rs:buffer_sizes() <= 5 * MB)
    -- rs goes on reading gradually.
    for _ = 1, 9 do assert.equal(MB, #assert(rs:read_bytes(MB))) end
  end, true)

  -- Not in Tornado: test_future_write's "never orphaned" when the stream
  -- closes while writers wait at the write high-water mark, by a local
  -- close() or by the peer closing: every waiting write returns
  -- nil, "closed" (its data is not delivered), none waits forever.
  local function writers_waiting(ws)
    local futs, waiting = {}, {}
    for i = 1, 4 do
      futs[i] = T.future(ws.write, ws, ("z"):rep(4 * MB))
      -- A task runs until it first waits: not done now means waiting.
      if not futs[i]:done() then waiting[#waiting + 1] = futs[i] end
    end
    assert.is_true(#waiting > 0, "no writer waits at the high-water mark")
    return waiting
  end

  test("test_future_write (closed while writers wait)", function()
    local _, ws = make()
    local waiting = writers_waiting(ws)
    ws:close()
    for _, f in ipairs(waiting) do assert.same({nil, "closed"}, {f:result(1)}, "what a waiting write returned") end
  end)

  test("test_future_write (peer closes while writers wait)", function()
    local rs, ws = make()
    local waiting = writers_waiting(ws)
    rs:close()
    for _, f in ipairs(waiting) do assert.same({nil, "closed"}, {f:result(1)}, "what a waiting write returned") end
  end)

  test("test_many_mixed_reads", function()
    -- Reads of random sizes, alternating between read_bytes(n) and partial
    -- reads (Tornado alternates read_bytes and read_into), against writes
    -- of random sizes; what comes out is what went in.
    local nbytes = 1000000
    local rs, ws = make()
    local rand = math.random
    math.randomseed(42)
    local produced, consumed = {}, {}
    local producer = T.future(function()
      local remaining = nbytes
      while remaining > 0 do
        local size = rand(1, math.min(1000, remaining))
        local bytes = {}
        for i = 1, size do bytes[i] = rand(0, 255) end
        local data = string.char(table.unpack(bytes))
        produced[#produced + 1] = data
        assert(ws:write(data))
        remaining = remaining - size
      end
      return remaining
    end)
    local remaining = nbytes
    while remaining > 0 do
      local size = rand(1, math.min(1000, remaining))
      if rand() > 0.5 then
        consumed[#consumed + 1] = assert(rs:read_bytes(size))
      else
        local got = 0
        while got < size do
          local data = assert(rs:read_bytes(size - got, true))
          consumed[#consumed + 1] = data
          got = got + #data
        end
      end
      remaining = remaining - size
    end
    assert.equal(0, producer:result())
    local a, b = table.concat(produced), table.concat(consumed)
    assert.equal(nbytes, #b)
    assert.is_true(a == b, "the bytes read differ from the bytes written")
  end)
end

-- TestIOStreamMixin: what only socket streams do.
local function iostream_mixin(kind)
  local make = kind.make
  local function test(name, fn)
    it(name, async(function() known(kind.name .. " " .. name, fn) end))
  end

  test("test_connection_refused", function()
    local port = refusing_port()
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", port)})
  end)

  test("test_gaierror", function()
    local stream, err = tcpclient.connect("nonexistent.invalid", 80)
    assert.is_nil(stream)
    assert.matches("^cannot resolve nonexistent%.invalid", err)
  end)

  test("test_future_write", function()
    -- Concurrent writers clog the socket and the write buffer: no write is
    -- left waiting forever (Tornado's sizes: 10 x 1000 x 5000 bytes).
    local m, n, nproducers = 5000, 1000, 10
    local total = m * n * nproducers
    local server, client = make({max_buffer_size = total})
    local finished, failure, settled = 0, nil, locks.Event()
    for _ = 1, nproducers do
      T.go(function()
        local data = ("x"):rep(m)
        local ok, err = pcall(function()
          for _ = 1, n do assert(server:write(data)) end
        end)
        if ok then finished = finished + 1 else failure = failure or err end
        if failure or finished == nproducers then settled:set() end
      end)
    end
    local consumer = T.future(function()
      local nread = 0
      while nread < total do nread = nread + #assert(client:read_bytes(m)) end
      return nread
    end)
    assert.is_true(settled:wait(5))
    if failure then error("a producer failed: " .. tostring(failure), 0) end
    assert.equal(total, consumer:result())
  end)
end

for _, kind in ipairs(T.PAIRS) do
  describe(kind.name, function()
    after_each(T.cleanup)
    read_write_mixin(kind)
    if kind.options then iostream_mixin(kind) end
  end)
end

describe("TestPipeIOStream", function()
  after_each(T.cleanup)
  local make = T.PAIRS[4].make

  it("test_pipe_iostream", async(function()
    local rs, ws = make()
    ws:write("hel")
    ws:write("lo world")
    assert.equal("hello ", rs:read_until(" "))
    assert.equal("wor", rs:read_bytes(3))
    ws:close()
    assert.equal("ld", rs:read_until_close())
  end))

  it("test_pipe_iostream_big_write", async(function()
    local rs, ws = make()
    local NUM_BYTES = 1048576
    -- 1 MiB fills the pipe: the writer runs in its own task.
    T.go(function() ws:write(("1"):rep(NUM_BYTES)) end)
    assert.is_true(rs:read_bytes(NUM_BYTES) == ("1"):rep(NUM_BYTES))
  end))
end)

-- TestIOStreamWebMixin over HTTP and HTTPS: a server answering every
-- request as HelloHandler does, then closing (HTTP/1.0).
local HELLO = "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=UTF-8\r\n"
  .. "Content-Length: 5\r\n\r\nHello"

local function hello_handler(_, stream)
  if stream:read_until("\r\n\r\n") then stream:write(HELLO) end
end

local WEB = {
  {name = "TestIOStreamWebHTTP", scheme = "http"},
  {name = "TestIOStreamWebHTTPS", scheme = "https", ssl_options = T.server_ssl,
   client = {ssl_options = {verify = "none"}}},
}

for _, web in ipairs(WEB) do
  describe(web.name, function()
    local server, port
    before_each(function()
      server, port = H.serve(hello_handler, {ssl_options = web.ssl_options and web.ssl_options()})
    end)
    after_each(function() server:stop() end)

    local function connect()
      return assert(tcpclient.connect("127.0.0.1", port, web.client))
    end

    it("test_connection_closed", async(function()
      -- The server answers and closes: the client must get the whole
      -- response first. fetch() is Python's urllib, a real HTTP client.
      local out, status = H.python([[
import ssl, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Connection": "close"})
ctx = ssl._create_unverified_context()
with urllib.request.urlopen(req, context=ctx) as r:
    sys.stdout.write("%d %s" % (r.status, r.read().decode()))
]], ("%s://127.0.0.1:%d/"):format(web.scheme, port))
      assert.equal(0, status)
      assert.equal("200 Hello", out)
    end))

    it("test_read_until_close", async(function()
      local stream = connect()
      stream:write("GET / HTTP/1.0\r\n\r\n")
      local data = assert(stream:read_until_close())
      assert.equal("HTTP/1.1 200", data:sub(1, 12))
      assert.equal("Hello", data:sub(-5))
    end))

    it("test_read_zero_bytes", async(function()
      local stream = connect()
      stream:write("GET / HTTP/1.0\r\n\r\n")
      assert.equal("HTTP/1.1 ", stream:read_bytes(9))
      assert.equal("", stream:read_bytes(0))
      assert.equal("200", stream:read_bytes(3))
      stream:close()
    end))

    it("test_future_interface", async(function()
      local stream = connect()
      assert.is_true(stream:write("GET / HTTP/1.0\r\n\r\n"))
      assert.equal("HTTP/1.1 200 OK\r\n", stream:read_until("\r\n"))
      local header_data = assert(stream:read_until("\r\n\r\n"))
      local content_length = tonumber(header_data:match("Content%-Length: (%d+)\r\n"))
      assert.equal("Hello", stream:read_bytes(content_length))
      stream:close()
    end))

    it("test_future_close_while_reading", async(function()
      local stream = connect()
      stream:write("GET / HTTP/1.0\r\n\r\n")
      assert.same({nil, "closed", HELLO}, {stream:read_bytes(1024 * 1024)})
      stream:close()
    end))

    it("test_future_read_until_close", async(function()
      -- The data comes through before the close.
      local stream = connect()
      stream:write("GET / HTTP/1.0\r\nConnection: close\r\n\r\n")
      assert(stream:read_until("\r\n\r\n"))
      assert.equal("Hello", stream:read_until_close())
      -- Nothing else to read: the error comes at once.
      assert.same({nil, "closed", ""}, {stream:read_bytes(1)})
    end))
  end)
end

describe("TestIOStreamStartTLS", function()
  after_each(T.cleanup)
  local server_stream, client_stream

  before_each(function() server_stream, client_stream = nil, nil end)

  local function setup()
    server_stream, client_stream = T.PAIRS[1].make()
  end

  local function client_send_line(line)
    client_stream:write(line)
    assert.equal(line, server_stream:read_until("\r\n"))
  end

  local function server_send_line(line)
    server_stream:write(line)
    assert.equal(line, client_stream:read_until("\r\n"))
  end

  local function client_start_tls(ssl_options, server_hostname)
    return T.future(client_stream.start_tls, client_stream, false, ssl_options, server_hostname)
  end

  local function server_start_tls(ssl_options)
    return T.future(server_stream.start_tls, server_stream, true, ssl_options)
  end

  it("test_start_tls_smtp", async(function()
    -- Simplified from RFC 3207 section 5: buffers stay sane after
    -- realistic back-and-forth traffic.
    setup()
    server_send_line("220 mail.example.com ready\r\n")
    client_send_line("EHLO mail.example.com\r\n")
    server_send_line("250-mail.example.com welcome\r\n")
    server_send_line("250 STARTTLS\r\n")
    client_send_line("STARTTLS\r\n")
    server_send_line("220 Go ahead\r\n")
    local client_future = client_start_tls({verify = "none"})
    local server_future = server_start_tls(T.server_ssl())
    assert.is_true(client_future:result())
    assert.is_true(server_future:result())
    assert.is_string(client_stream:tls_version())
    assert.is_string(server_stream:tls_version())
    client_send_line("EHLO mail.example.com\r\n")
    server_send_line("250 mail.example.com welcome\r\n")
  end))

  it("test_handshake_fail", async(function()
    -- Certificates are verified by default: the system store does not know
    -- the test CA.
    local logs, restore = H.capture_logs()
    setup()
    local server_future = server_start_tls(T.server_ssl())
    local client_future = client_start_tls({}, "localhost")
    local ok, err = client_future:result()
    assert.is_nil(ok)
    assert.matches("^tls: certificate verify failed", err)
    ok, err = server_future:result()
    restore()
    assert.same({nil, "tls: tlsv1 alert unknown ca"}, {ok, err})
    -- Tornado: ExpectLog(gen_log, "SSL Error"); here one line, no traceback.
    assert.equal(1, #logs)
    assert.matches("^info: TLS handshake failed with .*: tlsv1 alert unknown ca$", logs[1])
  end))

  it("test_check_hostname", async(function()
    -- server_hostname is what the certificate is checked against: the
    -- server's certificate is for other.test, not 127.0.0.1.
    local logs, restore = H.capture_logs()
    setup()
    local server_future = server_start_tls(T.server_ssl("other"))
    local client_future = client_start_tls({cafile = H.certs().cafile}, "127.0.0.1")
    assert.same({nil, "tls: certificate verify failed (IP address mismatch)"}, {client_future:result()})
    local ok, err = server_future:result()
    restore()
    assert.same({nil, "tls: sslv3 alert bad certificate"}, {ok, err})
    assert.equal(1, #logs)
    assert.matches("^info: TLS handshake failed with .*: sslv3 alert bad certificate$", logs[1])
  end))
end)

describe("WaitForHandshakeTest", function()
  -- Connects a TLS client (verification off, as Tornado's) to a server
  -- whose handle_stream is `handler`.
  local function connect_to_server(handler)
    local server, port = H.serve(handler, {ssl_options = T.server_ssl()})
    local client = assert(tcpclient.connect("127.0.0.1", port, {ssl_options = {verify = "none"}}))
    assert.is_not_nil(client:cipher())
    return server, client
  end

  it("test_wait_for_handshake_future", async(function()
    local handshake, cipher_before = locks.Event(), nil
    local server, client = connect_to_server(function(_, stream)
      -- handle_stream runs before the handshake is done.
      cipher_before = stream:cipher() or false
      ioloop.current():spawn_callback(function()
        assert.is_true(stream:wait_for_handshake())
        handshake:set()
      end)
      handshake:wait()
    end)
    assert.is_true(handshake:wait(5))
    assert.is_false(cipher_before)
    client:close()
    server:stop()
  end))

  it("test_wait_for_handshake_already_waiting_error", async(function()
    local handshake, raised = locks.Event(), nil
    local server, client = connect_to_server(function(_, stream)
      local fut = T.future(stream.wait_for_handshake, stream)
      raised = select(2, pcall(stream.wait_for_handshake, stream))
      assert.is_true(fut:result())
      handshake:set()
    end)
    assert.is_true(handshake:wait(5))
    assert.matches("already waiting", raised)
    client:close()
    server:stop()
  end))

  it("test_wait_for_handshake_already_connected", async(function()
    local handshake = locks.Event()
    local results = {}
    local server, client = connect_to_server(function(_, stream)
      results[1] = stream:wait_for_handshake()
      results[2] = stream:wait_for_handshake()
      handshake:set()
    end)
    assert.is_true(handshake:wait(5))
    assert.same({true, true}, results)
    client:close()
    server:stop()
  end))
end)

describe("TestIOStreamCheckHostname", function()
  -- The server's certificate is for other.test (Tornado's: foo.example.com);
  -- the client trusts the CA that signed it, so only the name can fail.
  local server, port, logs, restore
  before_each(function()
    logs, restore = H.capture_logs()
    server, port = H.serve(function(_, stream)
      if stream:wait_for_handshake() then stream:read_until_close() end
    end, {ssl_options = T.server_ssl("other")})
  end)
  after_each(function()
    server:stop()
    restore()
  end)

  local function connect(server_hostname, ssl_options)
    return tcpclient.connect("127.0.0.1", port, {
      ssl_options = ssl_options or ssl.context({cafile = H.certs().cafile}),
      server_hostname = server_hostname})
  end

  it("test_match", async(function()
    local stream = assert(connect("other.test"))
    stream:close()
  end))

  it("test_no_match", async(function()
    assert.same({nil, "tls: certificate verify failed (hostname mismatch)"}, {connect("bar.example.com")})
    -- The server logs the failed handshake once (Tornado: a warning with
    -- "alert bad certificate").
    H.wait_until(function() return #logs > 0 end)
    assert.equal(1, #logs)
    assert.matches("TLS handshake failed", logs[1])
  end))

  it("test_check_disabled", async(function()
    local stream = assert(connect("bar.example.com", {verify = "none"}))
    stream:close()
  end))
end)
