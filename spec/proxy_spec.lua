local H = require "spec.helper"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"
local ioloop = require "tcpserver.ioloop"

local async = H.async

-- A PROXY-protocol server that answers each connection with its address
-- and the first line it reads after the header.
local function serve(opts)
  opts = opts or {}
  opts.proxy_protocol = true
  return H.serve(function(_, stream, address)
    local line = stream:read_until("\n") or "-"
    stream:write(("%s %s %s"):format(address.family, tostring(address), line))
  end, opts)
end

-- Sends `payload` (Python bytes expression) and prints what comes back.
local function send(port, payload, pieces)
  return H.python(([[
import socket, struct, sys, time
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port))
data = %s
for i in range(0, len(data), %d):
    s.sendall(data[i:i + %d])
out = b""
while True:
    try:
        chunk = s.recv(4096)
    except ConnectionResetError:
        break
    if not chunk: break
    out += chunk
sys.stdout.write(out.decode("latin-1"))
]]):format(payload, pieces or 1 << 20, pieces or 1 << 20), tostring(port))
end

local V2_SIG = [[b"\r\n\r\n\x00\r\nQUIT\n"]]

describe("PROXY protocol", function()
  local logs, restore
  before_each(function() logs, restore = H.capture_logs() end)
  after_each(function() restore() end)

  it("takes the client's address from a v1 header", async(function()
    local server, port = serve()
    assert.equal("inet 203.0.113.7:4242 hello\n",
                 send(port, [[b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 443\r\nhello\n"]]))
    assert.equal("inet6 [2001:db8::1]:5555 six\n",
                 send(port, [[b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\nsix\n"]]))
    assert.matches("^inet 127%.0%.0%.1:%d+ unknown\n$",
                   (send(port, [[b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nunknown\n"]])))
    server:stop()
    assert.same({}, logs)
  end))

  it("parses a header that arrives a few bytes at a time", async(function()
    local server, port = serve({read_chunk_size = 3})
    assert.equal("inet 198.51.100.1:1000 split\n",
                 send(port, [[b"PROXY TCP4 198.51.100.1 10.0.0.1 1000 80\r\nsplit\n"]], 5))
    server:stop()
  end))

  it("takes the client's address from a v2 header, and LOCAL keeps the real one", async(function()
    local server, port = serve()
    local v4 = V2_SIG .. [[ + bytes([0x21, 0x11]) + struct.pack("!H", 12)
      + socket.inet_aton("192.0.2.9") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 6000, 443)
      + b"v2\n"]]
    assert.equal("inet 192.0.2.9:6000 v2\n", send(port, v4:gsub("\n%s+", " ")))
    local v6 = V2_SIG .. [[ + bytes([0x21, 0x21]) + struct.pack("!H", 36 + 5)
      + socket.inet_pton(socket.AF_INET6, "2001:db8::9") + socket.inet_pton(socket.AF_INET6, "::1")
      + struct.pack("!HH", 7000, 443) + b"\x04\x00\x02ab" + b"tlv\n"]]
    assert.equal("inet6 [2001:db8::9]:7000 tlv\n", send(port, v6:gsub("\n%s+", " ")))
    local localcmd = V2_SIG .. [[ + bytes([0x20, 0x00]) + struct.pack("!H", 0) + b"health\n"]]
    assert.matches("^inet 127%.0%.0%.1:%d+ health\n$", (send(port, localcmd)))
    server:stop()
    assert.same({}, logs)
  end))

  describe("refuses with one info line", function()
    local cases = {
      {"a connection without a header", [[b"GET / HTTP/1.0\r\n\r\n"]], "no PROXY header"},
      {"a malformed v1 header", [[b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\nx\n"]], "malformed v1 header"},
      {"an oversized v1 header", [[b"PROXY TCP4 " + b"1" * 200]], "header line too long"},
      {"an oversized v2 header", V2_SIG .. [[ + bytes([0x21, 0x11]) + struct.pack("!H", 5000) + b"x" * 5000]],
       "header too large"},
      {"a v2 header of another version", V2_SIG .. [[ + bytes([0x31, 0x11]) + struct.pack("!H", 0)]],
       "malformed v2 header"},
      {"a header cut short by the peer", [[b"PROXY TCP4 1.2.3.4"]], "connection closed inside the header"},
      {"a v1 header with a bad destination", [[b"PROXY TCP4 1.2.3.4 not-an-ip 1 2\r\nx\n"]],
       "malformed v1 header"},
      {"a v1 header whose destination is of another family", [[b"PROXY TCP4 1.2.3.4 ::1 1 2\r\nx\n"]],
       "malformed v1 header"},
      {"a v1 header with a signed port", [[b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\nx\n"]],
       "malformed v1 header"},
      {"a v2 header of unknown family 0x5", V2_SIG .. [[ + bytes([0x21, 0x51]) + struct.pack("!H", 12)
        + b"\x01" * 12 + b"x\n"]], "unknown v2 address family"},
      {"a v2 header of unknown family 0xF", V2_SIG .. [[ + bytes([0x21, 0xF1]) + struct.pack("!H", 12)
        + b"\x01" * 12 + b"x\n"]], "unknown v2 address family"},
      {"a v2 header of unknown transport 0xF", V2_SIG .. [[ + bytes([0x21, 0x1F]) + struct.pack("!H", 12)
        + b"\x01" * 12 + b"x\n"]], "unknown v2 transport"},
    }
    for _, case in ipairs(cases) do
      it(case[1], async(function()
        local server, port = serve()
        if case[3] == "connection closed inside the header" then
          H.python([[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"PROXY TCP4 1.2.3.4")
s.close()
]], tostring(port))
        else
          assert.equal("", send(port, (case[2]:gsub("\n%s+", " "))))
        end
        H.wait_until(function() return #logs > 0 end)
        server:stop()
        assert.equal(1, #logs)
        assert.equal("info: PROXY protocol: " .. case[3] .. " from 127.0.0.1; closing", logs[1])
      end))
    end

    it("a header that does not arrive in time", async(function()
      local server, port = serve({handshake_timeout = 0.1})
      local c = H.connect(port)
      c:write("PROXY TCP4 ")
      assert.equal("", c:read_until_close())
      server:stop()
      assert.same({"info: PROXY protocol: header timed out from 127.0.0.1; closing"}, logs)
    end))
  end)

  it("gives the header and the TLS handshake one handshake_timeout, not one each", async(function()
    -- each phase had its own: a peer that sent its header late could
    -- stall the handshake a whole handshake_timeout more
    local C = H.certs()
    local server, port = serve({handshake_timeout = 1,
                                ssl_options = {certfile = C.server.certfile, keyfile = C.server.keyfile}})
    finally(function() server:stop() end)
    local out = H.python([[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
t0 = time.monotonic()
time.sleep(0.7)  # the header comes late, then no ClientHello at all
s.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 443\r\n")
s.recv(1)  # the server closes
print(round(time.monotonic() - t0, 1))
]], tostring(port))
    -- closed at the connection's deadline (1 s), not 0.7 + 1 s
    assert.is_true(tonumber(out) < 1.5, out)
  end))

  -- Registry refs that hold a value (freed slots hold free-list numbers).
  local function live_refs()
    local n = 0
    for k, v in pairs(debug.getregistry()) do
      if math.type(k) == "integer" and type(v) ~= "number" then n = n + 1 end
    end
    return n
  end

  it("frees a connection that the client resets inside the header", async(function()
    local server, port = serve()
    assert.equal("inet 1.1.1.1:1 warm\n", send(port, [[b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\nwarm\n"]]))
    local base = live_refs()
    H.python([[
import socket, struct, sys
for i in range(20):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"PROXY TCP4 1.2.3.4")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
]], tostring(port))
    H.wait_until(function() return live_refs() <= base and server:connection_count() == 0 end)
    server:stop()
  end))

  it("counts connections waiting for their header against max_connections", async(function()
    local peak, server = 0, nil
    local port
    server, port = H.serve(function(_, stream, address)
      peak = math.max(peak, server:connection_count())
      stream:write(tostring(address) .. " " .. stream:read_until("\n"))
    end, {proxy_protocol = true, max_connections = 2})
    local silent = {H.connect(port), H.connect(port)}
    H.wait_until(function() return server:connection_count() == 2 end)
    local c = H.connect(port) -- queued by the kernel, not accepted
    c:write("PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\nthird\n")
    silent[1]:close()
    assert.equal("1.1.1.1:1 third\n", c:read_until_close())
    silent[2]:close()
    H.wait_until(function() return server:connection_count() == 0 end)
    server:stop()
    assert.equal(2, peak)
  end))

  it("closes a port probe silently", async(function()
    local server, port = serve()
    local c = H.connect(port)
    c:close()
    local c2 = H.connect(port)
    c2:write("PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\nok\n")
    assert.equal("inet 1.1.1.1:1 ok\n", c2:read_until_close())
    server:stop()
    assert.same({}, logs)
  end))

  describe("behind HAProxy", function()
    local function free_port()
      local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
      local _, port = sock:getsockname()
      sock:close()
      return port
    end

    local function haproxy(backend_port, send_proxy)
      local front = free_port()
      local cfg = os.tmpname()
      local f = assert(io.open(cfg, "w"))
      f:write(([[
global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend fe
  bind 127.0.0.1:%d
  default_backend be
backend be
  server s1 127.0.0.1:%d %s
]]):format(front, backend_port, send_proxy))
      f:close()
      local p = process.Subprocess({"haproxy", "-db", "-f", cfg}, {stdout = "null", stderr = "pipe"})
      H.wait_until(function()
        local c = tcpclient.connect("127.0.0.1", front)
        if c then c:close() return true end
      end)
      finally(function() p:kill(9); os.remove(cfg) end)
      return front, function() p:kill(15); p:wait_for_exit() end
    end

    for _, mode in ipairs {"send-proxy", "send-proxy-v2"} do
      it("gets the original client address with " .. mode, async(function()
        local server, port = serve()
        local front, stop = haproxy(port, mode)
        local c = assert(tcpclient.connect("127.0.0.1", front))
        local _, cport = c:getsockname()
        c:write("through haproxy\n")
        assert.equal(("inet 127.0.0.1:%d through haproxy\n"):format(cport), c:read_until_close())
        server:stop()
        stop()
      end))
    end

    it("passes TLS through to a TLS server behind send-proxy-v2", async(function()
      local C = H.certs()
      local server, port = serve({ssl_options = {certfile = C.server.certfile, keyfile = C.server.keyfile}})
      local front, stop = haproxy(port, "send-proxy-v2")
      local c = assert(tcpclient.connect("127.0.0.1", front, {ssl_options = {cafile = C.cafile},
                                                             server_hostname = "localhost"}))
      local _, cport = c:getsockname()
      c:write("secure\n")
      assert.equal(("inet 127.0.0.1:%d secure\n"):format(cport), c:read_until_close())
      assert.equal("TLSv1.3", c:tls_version())
      server:stop()
      stop()
    end))
  end)

  it("is off by default: a header is plain data", async(function()
    local server, port = H.serve(function(_, stream) stream:write(stream:read_until("\n")) end)
    local c = H.connect(port)
    c:write("PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")
    assert.equal("PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n", c:read_until_close())
    server:stop()
    ioloop.sleep(0)
  end))
end)

describe("PROXY protocol, what follows the header", function()
  it("keeps what came after the header past max_buffer_size", H.async(function()
    local got
    local server, port = H.serve(function(_, stream)
      local parts, n = {}, 0
      while n < 20000 do
        local d = assert(stream:read_bytes(1000))
        parts[#parts + 1] = d
        n = n + #d
      end
      got = table.concat(parts)
    end, {proxy_protocol = true, max_buffer_size = 4096})
    finally(function() server:stop() end)
    H.python([[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 443\r\n" + b"y" * 20000)
s.recv(1)
]], tostring(port))
    H.wait_until(function() return got end)
    assert.equal(("y"):rep(20000), got)
  end))
end)
