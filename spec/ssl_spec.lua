local H = require "spec.helper"
local ssl = require "tcpserver.ssl"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local process = require "tcpserver.process"

local async = H.async
local C = H.certs()

local function server_opts(extra)
  local o = {certfile = C.server.certfile, keyfile = C.server.keyfile}
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local echo = H.echo_lines

local function tls_serve(handler, ssl_extra, opts)
  opts = opts or {}
  opts.ssl_options = server_opts(ssl_extra)
  return H.serve(handler, opts)
end

local function tls_connect(port, opts)
  opts = opts or {}
  opts.ssl_options = opts.ssl_options or {cafile = C.cafile}
  return tcpclient.connect("127.0.0.1", port, opts)
end

-- Runs a Python ssl client: the snippet gets `ctx`, `port`, `ca`, `certs`.
local function python_tls(port, body)
  return H.python(([[
import socket, ssl, sys
port, ca, certs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
%s
]]):format(body), tostring(port), C.cafile, C.dir)
end

describe("TLS", function()
  local logs, restore
  before_each(function() logs, restore = H.capture_logs() end)
  after_each(function() restore() end)

  describe("ssl.context", function()
    it("builds a reusable context accepted wherever ssl_options is", async(function()
      local ctx = ssl.context(server_opts())
      assert.is_true(ssl.is_context(ctx))
      local server, port = H.serve(echo, {ssl_options = ctx})
      local other, port2 = H.serve(echo, {ssl_options = ctx})
      for _, p in ipairs {port, port2} do
        local c = assert(tls_connect(p))
        c:write("ctx\n")
        assert.equal("ctx\n", c:read_until("\n"))
        c:close()
      end
      server:stop(); other:stop()
    end))

    it("accepts LuaSec's names as aliases", function()
      assert.is_true(ssl.is_context(ssl.context({certificate = C.server.certfile, key = C.server.keyfile})))
    end)

    it("raises clear errors for bad options when built", function()
      assert.has_error(function() ssl.context({certfile = "/no/such.pem"}) end,
                       "ssl_options: cannot read certfile /no/such.pem")
      assert.has_error(function() ssl.context({colour = "red"}) end, "ssl_options: unknown option 'colour'")
      assert.has_error(function() ssl.context({verify = "sometimes"}) end,
                       "ssl_options: verify must be \"none\", \"optional\" or \"required\" (or LuaSec's "
                       .. "{\"peer\"}, {\"peer\", \"fail_if_no_peer_cert\"}, {\"none\"}), got 'sometimes'")
      assert.has_error(function() ssl.context({min_version = "tls1.3"}) end,
                       "ssl_options: unknown min_version 'tls1.3' (valid: tlsv1, tlsv1.1, tlsv1.2, tlsv1.3)")
      local ok, err = pcall(ssl.context, {certfile = C.server.certfile, keyfile = C.other.keyfile})
      assert.is_false(ok)
      assert.matches("does not match the certificate", err)
      ok, err = pcall(ssl.context, {certfile = C.server.keyfile, keyfile = C.server.keyfile})
      assert.is_false(ok)
      assert.matches("cannot load certfile", err)
      assert.has_error(function() tcpserver.TCPServer({ssl_options = {cafile = C.cafile}}) end,
                       "ssl_options: a server needs certfile (and keyfile)")
      assert.has_error(function() tcpserver.TCPServer({ssl_options = {certfile = 1}}) end,
                       "ssl_options: 'certfile' must be a string, got number")
    end)

    it("names the missing keyfile instead of failing to read the certificate as a key", function()
      assert.has_error(function() ssl.context({certfile = C.server.certfile}) end,
                       ("ssl_options: keyfile is missing: certfile %s holds no private key "
                        .. "(give keyfile = \"...\")"):format(C.server.certfile))
      -- one file with both still works without keyfile
      local both = C.dir .. "/both.pem"
      local f = assert(io.open(both, "w"))
      for _, path in ipairs {C.server.certfile, C.server.keyfile} do
        local src = assert(io.open(path))
        f:write(src:read("a"))
        src:close()
      end
      f:close()
      assert.is_true(ssl.context({certfile = both}):has_certificate())
    end)

    it("refuses to verify client certificates on a server without cafile", function()
      for _, verify in ipairs {"required", "optional"} do
        assert.has_error(function() tcpserver.TCPServer({ssl_options = server_opts({verify = verify})}) end,
                         ("ssl_options: verify = \"%s\" on a server needs cafile (or capath): the "
                          .. "CAs that sign the client certificates"):format(verify))
      end
      -- a client verifies against the system store without one
      assert.is_true(ssl.is_context(ssl.context({verify = "required"})))
    end)

    it("refuses LuaSec names it cannot honour, listing what it takes", function()
      assert.has_error(function() ssl.context({protocol = "sslv3"}) end,
                       "ssl_options: unknown protocol 'sslv3' (LuaSec's names: any, tlsv1_2, tlsv1_3; "
                       .. "or use min_version)")
      assert.has_error(function() ssl.context({options = {"all", "cipher_server_preference"}}) end,
                       "ssl_options: options: 'cipher_server_preference' is not supported (accepted: "
                       .. "no_tlsv1, no_tlsv1_1, no_tlsv1_2, all, no_compression, no_renegotiation, "
                       .. "no_sslv2, no_sslv3, single_dh_use, single_ecdh_use)")
      assert.has_error(function() ssl.context({capath = C.cafile}) end,
                       ("ssl_options: capath %s is not a directory"):format(C.cafile))
      assert.has_error(function() ssl.context({certfile = C.server.certfile, certificate = C.server.certfile}) end,
                       "ssl_options: 'certfile' and 'certificate' are the same option")
      assert.is_true(ssl.is_context(ssl.context({capath = "/etc/ssl/certs", protocol = "any"})))
    end)
  end)

  describe("server with LuaSec's option names", function()
    -- certificate/key, verify = {"peer", "fail_if_no_peer_cert"},
    -- protocol = "tlsv1_3" and options = {"all", "no_sslv3"}.
    local function luasec_serve(verify)
      return H.serve(function(_, stream)
        if not stream:wait_for_handshake() then return end
        local cert = stream:peer_certificate()
        stream:write((cert and cert.subject or "none") .. " " .. stream:tls_version() .. "\n")
      end, {ssl_options = {certificate = C.server.certfile, key = C.server.keyfile, cafile = C.cafile,
                           verify = verify, protocol = "tlsv1_3", options = {"all", "no_sslv3"}}})
    end

    local function s_client(port, ...)
      local argv = {"openssl", "s_client", "-connect", "127.0.0.1:" .. port, "-CAfile", C.cafile,
                    "-verify_return_error", "-quiet", ...}
      return H.run(argv, "")
    end

    it("requires a client certificate and TLS 1.3", async(function()
      local server, port = luasec_serve({"peer", "fail_if_no_peer_cert"})
      assert.equal("CN=test client TLSv1.3\n",
                   (s_client(port, "-cert", C.client.certfile, "-key", C.client.keyfile)))
      assert.equal("", (s_client(port)))                       -- no certificate: refused
      assert.equal("", (s_client(port, "-cert", C.client.certfile, "-key", C.client.keyfile,
                                 "-tls1_2")))                   -- TLS 1.2: below the floor
      server:stop()
    end))

    it("takes {\"peer\"} as optional and {\"none\"} as none", async(function()
      local server, port = luasec_serve({"peer"})
      assert.equal("none TLSv1.3\n", (s_client(port)))
      assert.equal("CN=test client TLSv1.3\n",
                   (s_client(port, "-cert", C.client.certfile, "-key", C.client.keyfile)))
      server:stop()
      server, port = luasec_serve({"none"})
      assert.equal("none TLSv1.3\n", (s_client(port, "-cert", C.client.certfile, "-key", C.client.keyfile)))
      server:stop()
    end))
  end)

  describe("server", function()
    it("serves our client with TLS 1.3, verified against the test CA", async(function()
      local info = {}
      local server, port = tls_serve(function(_, stream)
        info.before = stream:tls_version()
        assert.is_true(stream:wait_for_handshake())
        assert.is_true(stream:wait_for_handshake())
        info.after = stream:tls_version()
        echo(_, stream)
      end)
      local c = assert(tls_connect(port))
      c:write("secret\n")
      assert.equal("secret\n", c:read_until("\n"))
      assert.equal("TLSv1.3", c:tls_version())
      assert.is_string(c:cipher())
      local cert = c:peer_certificate()
      assert.equal("CN=localhost", cert.subject)
      assert.equal("CN=tcpserver test CA", cert.issuer)
      assert.is_true(cert.verified)
      assert.matches("^%-%-%-%-%-BEGIN CERTIFICATE", cert.pem)
      assert.is_true(cert.not_before <= os.time() and os.time() < cert.not_after)
      c:close()
      server:stop()
      assert.same({after = "TLSv1.3"}, info)
    end))

    it("gives the certificate's subject as an RFC 2253 string, as the README documents", async(function()
      local key, cert = C.dir .. "/utf8.key", C.dir .. "/utf8.pem"
      local _, status = H.run({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                               "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-utf8",
                               "-subj", "/C=FR/O=Example, Inc./CN=caf\xC3\xA9"})
      assert.equal(0, status)
      local server, port = H.serve(echo, {ssl_options = {certfile = cert, keyfile = key}})
      local c = assert(tls_connect(port, {ssl_options = {verify = "none"}}))
      local got = c:peer_certificate()
      c:close()
      server:stop()
      assert.equal("CN=caf\\C3\\A9,O=Example\\, Inc.,C=FR", got.subject)
      assert.equal(got.subject, got.issuer)
      assert.is_false(got.verified)
      assert.matches("^%x+$", got.serial)
    end))

    it("speaks TLS 1.2 with openssl s_client", async(function()
      local server, port = tls_serve(function(_, stream)
        local line = stream:read_until("\n")
        stream:write(stream:tls_version() .. " " .. line)
      end)
      local out, status = H.run({"openssl", "s_client", "-connect", "127.0.0.1:" .. port, "-tls1_2",
                                 "-CAfile", C.cafile, "-verify_return_error", "-quiet"}, "over s_client\n")
      server:stop()
      assert.equal(0, status)
      assert.equal("TLSv1.2 over s_client\n", out)
    end))

    it("serves Python's ssl module and picks ALPN by server preference", async(function()
      local picked
      local server, port = tls_serve(function(_, stream)
        stream:wait_for_handshake()
        picked = stream:alpn_protocol()
        echo(_, stream)
      end, {alpn = {"h2", "http/1.1"}})
      local out = python_tls(port, [[
ctx.set_alpn_protocols(["http/1.1", "h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
s.sendall(b"py\n")
print(s.recv(10).decode().strip(), s.selected_alpn_protocol(), s.version())
]])
      server:stop()
      assert.equal("py h2 TLSv1.3\n", out)
      assert.equal("h2", picked)
    end))

    it("requires client certificates with verify = required", async(function()
      local subject
      local server, port = tls_serve(function(_, stream)
        if stream:wait_for_handshake() then
          subject = stream:peer_certificate().subject
          echo(_, stream)
        end
      end, {verify = "required", cafile = C.cafile})
      local c = assert(tls_connect(port, {ssl_options = {cafile = C.cafile, certfile = C.client.certfile,
                                                         keyfile = C.client.keyfile}}))
      c:write("with cert\n")
      assert.equal("with cert\n", c:read_until("\n"))
      c:close()
      assert.equal("CN=test client", subject)
      -- Without a certificate the server refuses (TLS 1.3 reports it on first read).
      local nc = tls_connect(port)
      local got, err = nil, nil
      if nc then got, err = nc:read_until("\n") end
      assert.is_nil(got)
      assert.matches("^tls: ", err or "tls: handshake refused")
      server:stop()
      H.wait_until(function() return #logs > 0 end)
      assert.matches("^info: TLS handshake failed with 127%.0%.0%.1:%d+: peer did not return a certificate", logs[1])
    end))

    it("accepts a client with or without a certificate with verify = optional", async(function()
      local seen = {}
      local server, port = tls_serve(function(_, stream)
        stream:wait_for_handshake()
        local cert = stream:peer_certificate()
        seen[#seen + 1] = cert and cert.subject or "none"
        echo(_, stream)
      end, {verify = "optional", cafile = C.cafile})
      for _, o in ipairs {{cafile = C.cafile},
                          {cafile = C.cafile, certfile = C.client.certfile, keyfile = C.client.keyfile}} do
        local c = assert(tls_connect(port, {ssl_options = o}))
        c:write("x\n")
        assert.equal("x\n", c:read_until("\n"))
        c:close()
      end
      server:stop()
      assert.same({"none", "CN=test client"}, seen)
    end))

    it("picks the certificate by SNI", async(function()
      local server, port = tls_serve(echo, {sni = {["other.test"] = C.other}})
      local c = assert(tls_connect(port, {server_hostname = "other.test"}))
      assert.equal("CN=other.test", c:peer_certificate().subject)
      c:close()
      c = assert(tls_connect(port, {server_hostname = "localhost"}))
      assert.equal("CN=localhost", c:peer_certificate().subject)
      c:close()
      local out = H.run({"openssl", "s_client", "-connect", "127.0.0.1:" .. port, "-servername", "other.test",
                         "-CAfile", C.cafile}, "")
      assert.matches("subject=CN ?= ?other.test", out)
      server:stop()
    end))

    it("moves 16 MiB each way", async(function()
      local n = 16 * 1024 * 1024
      local server, port = tls_serve(function(_, stream)
        local data = assert(stream:read_bytes(n))
        stream:write(data)
      end)
      local c = assert(tls_connect(port))
      local chunk = ("0123456789abcdef"):rep(4096)
      for _ = 1, n // #chunk do assert(c:write(chunk)) end
      local back = assert(c:read_bytes(n))
      assert.equal(n, #back)
      assert.equal(chunk, back:sub(1, #chunk))
      assert.equal(chunk, back:sub(-#chunk))
      c:close()
      server:stop()
    end, 30))

    it("serves 200 concurrent TLS connections", async(function()
      local server, port = tls_serve(echo)
      local ctx = ssl.context({cafile = C.cafile})
      local done, ok = 0, 0
      for i = 1, 200 do
        ioloop.current():spawn(function()
          local c = tls_connect(port, {ssl_options = ctx})
          if c then
            c:write(i .. "\n")
            if c:read_until("\n") == i .. "\n" then ok = ok + 1 end
            c:close()
          end
          done = done + 1
        end)
      end
      H.wait_until(function() return done == 200 end, 25)
      server:stop()
      assert.equal(200, ok)
    end, 30))

    it("sends close_notify on close and reads the peer's as 'closed'", async(function()
      local result
      local server, port = tls_serve(function(_, stream)
        stream:write(stream:read_until("\n"))
        result = {stream:read_until("\n")}
      end)
      local out = python_tls(port, [[
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
s.sendall(b"bye\n")
print(s.recv(10).decode().strip())
s.unwrap()  # our close_notify, then Python waits for the server's
print("clean")
]])
      H.wait_until(function() return result end)
      server:stop()
      assert.equal("bye\nclean\n", out)
      assert.same({nil, "closed", ""}, result)
    end))

    it("raises on a concurrent wait_for_handshake", async(function()
      local err
      local server, port = tls_serve(function(_, stream)
        ioloop.current():spawn(function() stream:wait_for_handshake() end)
        local ok, e = pcall(stream.wait_for_handshake, stream)
        err = not ok and e
      end)
      local c = tls_connect(port)
      if c then c:close() end
      server:stop()
      assert.matches("already waiting", err)
    end))
  end)

  describe("failures", function()
    local function raw(port, body)
      return H.python(([[
import socket, sys, struct
port = int(sys.argv[1])
%s
]]):format(body), tostring(port))
    end

    local function check_still_serves(port)
      local c = assert(tls_connect(port))
      c:write("alive\n")
      assert.equal("alive\n", c:read_until("\n"))
      c:close()
    end

    it("closes on plain text with one info line, and keeps serving", async(function()
      local server, port = tls_serve(echo)
      local out = raw(port, [[
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
print(len(s.recv(100)) >= 0)
]])
      assert.equal("True\n", out)
      check_still_serves(port)
      server:stop()
      H.wait_until(function() return #logs > 0 end)
      assert.equal(1, #logs)
      assert.matches("^info: TLS handshake failed with 127%.0%.0%.1:%d+: ", logs[1])
    end))

    it("stays silent for a port probe that sends nothing", async(function()
      local server, port = tls_serve(echo)
      local closed = false
      raw(port, [[socket.create_connection(("127.0.0.1", port)).close()]])
      local c = assert(tls_connect(port))
      c:set_close_callback(function() closed = true end)
      c:close()
      H.wait_until(function() return closed end)
      server:stop()
      assert.same({}, logs)
    end))

    it("logs a truncated ClientHello and one abandoned past handshake_timeout", async(function()
      local server, port = tls_serve(echo, nil, {handshake_timeout = 0.2})
      -- The first bytes of a ClientHello: a record header and a few more.
      raw(port, [[
s = socket.create_connection(("127.0.0.1", port))
s.sendall(bytes.fromhex("16030100c8010000c40303"))
s.close()
]])
      local out = raw(port, [[
s = socket.create_connection(("127.0.0.1", port))
s.sendall(bytes.fromhex("16030100c8010000c40303"))
print(s.recv(100) == b"")
]])
      assert.equal("True\n", out)
      check_still_serves(port)
      server:stop()
      H.wait_until(function() return #logs >= 2 end)
      -- in either order: the lines name the client ports, which the kernel picks
      local text = table.concat(logs, "\n")
      assert.equal(2, #logs)
      assert.matches("connection closed during handshake", text)
      assert.matches("handshake timed out", text)
    end))

    it("logs a reset in the middle of the handshake", async(function()
      local server, port = tls_serve(echo)
      raw(port, [[
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
]])
      H.wait_until(function() return #logs > 0 end)
      check_still_serves(port)
      server:stop()
      assert.equal(1, #logs)
      -- The reset may be seen as such or as an early end of the stream.
      assert.matches("^info: TLS handshake failed with 127%.0%.0%.1:%d+: connection", logs[1])
    end))

    it("logs a client that rejects our certificate", async(function()
      local server, port = tls_serve(echo, {certfile = C.self.certfile, keyfile = C.self.keyfile})
      local c, err = tls_connect(port)
      assert.is_nil(c)
      assert.equal("tls: certificate verify failed (self-signed certificate)", err)
      H.wait_until(function() return #logs > 0 end)
      server:stop()
      assert.matches("^info: TLS handshake failed with 127%.0%.0%.1:%d+: .*unknown ca", logs[1])
    end))
  end)

  describe("client", function()
    local server, port
    before_each(function() server, port = tls_serve(echo) end)
    after_each(function() server:stop() end)

    it("checks the host name by default", async(function()
      local c, err = tls_connect(port, {server_hostname = "wrong.test"})
      assert.is_nil(c)
      assert.equal("tls: certificate verify failed (hostname mismatch)", err)
    end))

    it("verifies against the system store without a cafile", async(function()
      local c, err = tcpclient.connect("127.0.0.1", port, {ssl_options = {}})
      assert.is_nil(c)
      assert.equal("tls: certificate verify failed (unable to get local issuer certificate)", err)
    end))

    it("skips verification only when told verify = none", async(function()
      local c = assert(tcpclient.connect("127.0.0.1", port, {ssl_options = {verify = "none"},
                                                            server_hostname = "wrong.test"}))
      c:write("unverified\n")
      assert.equal("unverified\n", c:read_until("\n"))
      assert.is_false(c:peer_certificate().verified)
      c:close()
    end))

    -- Each of these names switched the certificate's name check off or
    -- cut it short in C; Python's ssl refuses all three as well.
    local UNCHECKABLE = {
      {"", "connect: server_hostname must not be empty"},
      {".test", "connect: server_hostname '.test' starts with a dot"}, -- matched other.test
      {"localhost\0.bank.test", "connect: server_hostname contains a NUL byte"},
    }

    it("refuses a server_hostname that would not be checked, before connecting", async(function()
      -- the other.test certificate: ".test" passed its name check
      local other, other_port = tls_serve(echo, {certfile = C.other.certfile, keyfile = C.other.keyfile})
      finally(function() other:stop() end)
      for _, case in ipairs(UNCHECKABLE) do
        assert.has_error(function() tls_connect(port, {server_hostname = case[1]}) end, case[2])
        assert.has_error(function() tls_connect(other_port, {server_hostname = case[1]}) end, case[2])
      end
      for _, name in ipairs {"a..b", "-", "x y", "*.test", ("a"):rep(64) .. ".test", "[::1]"} do
        assert.has_error(function() tls_connect(port, {server_hostname = name}) end,
                         "connect: server_hostname '" .. name .. "' is neither a DNS name nor an IP address")
      end
      assert.has_error(function()
        tcpclient.connect("localhost\0.bank.test", port, {ssl_options = {cafile = C.cafile}})
      end, "connect: host contains a NUL byte")
      assert.has_error(function() tcpclient.connect("127.0.0.1\0x", port) end, "connect: host contains a NUL byte")
      local c = H.connect(port)
      assert.has_error(function() c:start_tls(false, {cafile = C.cafile}, "") end,
                       "start_tls: server_hostname must not be empty")
      c:close()
      local out = H.python([[
import ssl, sys
for name in sys.argv[2:]:
    try:
        ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(),
                                              server_hostname=name.replace("NUL", "\0"))
        print("accepted")
    except (ValueError, TypeError):
        print("refused")
]], "x", "", ".test", "localhost" .. "NUL" .. ".bank.test")
      assert.equal("refused\nrefused\nrefused\n", out)
    end))

    it("still checks valid names: an IP, a name with a trailing dot", async(function()
      for _, name in ipairs {"127.0.0.1", "localhost."} do
        local c = assert(tls_connect(port, {server_hostname = name}))
        c:write("n\n")
        assert.equal("n\n", c:read_until("\n"))
        c:close()
      end
      local c, err = tls_connect(port, {server_hostname = "other.test."})
      assert.is_nil(c)
      assert.equal("tls: certificate verify failed (hostname mismatch)", err)
    end))

    it("talks to openssl s_server", async(function()
      local p = process.Subprocess({"openssl", "s_server", "-accept", "0", "-cert", C.server.certfile,
                                    "-key", C.server.keyfile, "-naccept", "1", "-rev"},
                                   {stdin = "pipe", stdout = "pipe", stderr = "null"})
      local sport
      repeat
        local line = assert(p.stdout:read_until("\n"))
        sport = line:match("ACCEPT .*:(%d+)")
      until sport
      local c = assert(tcpclient.connect("localhost", tonumber(sport), {ssl_options = {cafile = C.cafile}}))
      c:write("abc\n")
      assert.equal("cba\n", c:read_until("\n"))
      c:close()
      p.stdin:close()
      p:kill()
      p:wait_for_exit()
    end))
  end)

  describe("start_tls", function()
    it("upgrades a plain connection in place (STARTTLS)", async(function()
      local server, port = H.serve(function(_, stream)
        assert.equal("STARTTLS\n", stream:read_until("\n"))
        stream:write("GO\n")
        assert.is_true(stream:start_tls(true, server_opts()))
        echo(_, stream)
      end)
      local c = H.connect(port)
      c:write("STARTTLS\n")
      assert.equal("GO\n", c:read_until("\n"))
      assert.is_nil(c:tls_version())
      assert.is_true(c:start_tls(false, {cafile = C.cafile}, "localhost"))
      assert.equal("TLSv1.3", c:tls_version())
      c:write("now encrypted\n")
      assert.equal("now encrypted\n", c:read_until("\n"))
      c:close()
      server:stop()
    end))

    it("refuses while plain data is buffered or a read is pending", async(function()
      local errs = {}
      local server, port = H.serve(function(_, stream)
        stream:read_bytes(1)
        errs[1] = select(2, pcall(stream.start_tls, stream, true, server_opts()))
        stream:read_bytes(2)
        ioloop.current():spawn(function() stream:read_bytes(1) end)
        errs[2] = select(2, pcall(stream.start_tls, stream, true, server_opts()))
      end)
      local c = H.connect(port)
      c:write("abc")
      c:read_until_close()
      server:stop()
      assert.matches("plain data is buffered", errs[1])
      assert.matches("a read or write is pending", errs[2])
    end))
  end)
end)

describe("TLS regressions", function()
  local restore
  before_each(function() restore = select(2, H.capture_logs()) end)
  after_each(function() restore() end)

  it("keeps data that arrives with close_notify apart from other connections", async(function()
    local locks = require "tcpserver.locks"
    local other_done = locks.Event()
    local got
    local server, port = tls_serve(function(_, stream)
      local first = stream:read_bytes(1)
      if first == "A" then
        other_done:wait()
        got.A = first .. (stream:read_until_close() or "")
      else
        got.B = first .. assert(stream:read_bytes(99))
        other_done:set()
      end
    end)
    finally(function() server:stop() end)
    for _ = 1, 3 do
      got = {}
      other_done = locks.Event()
      local a = assert(tls_connect(port))
      a:write("A" .. ("a"):rep(41))
      a:close() -- data and close_notify leave in one segment
      local b = assert(tls_connect(port))
      b:write(("B"):rep(100))
      H.wait_until(function() return got.A end)
      b:close()
      assert.equal("A" .. ("a"):rep(41), got.A)
      assert.equal(("B"):rep(100), got.B)
    end
  end))

  it("returns from a large write made before the handshake completes", async(function()
    local n = 2 * 1024 * 1024
    local wrote
    local server, port = tls_serve(function(_, stream)
      wrote = stream:write(("z"):rep(n))
      stream:write("\n")
    end)
    finally(function() server:stop() end)
    local c = assert(tls_connect(port))
    local back = assert(c:read_until("\n"))
    assert.equal(n + 1, #back)
    H.wait_until(function() return wrote ~= nil end)
    assert.is_true(wrote)
    c:close()
  end))

  it("reports a handshake that succeeded although the client closed at once", async(function()
    local res
    local server, port = tls_serve(function(_, stream)
      res = {stream:wait_for_handshake()}
    end)
    finally(function() server:stop() end)
    local out = python_tls(port, [[
# handshake over memory BIOs, so that Finished and close_notify leave in one segment
s = socket.create_connection(("127.0.0.1", port))
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ctx.wrap_bio(inc, out, server_hostname="localhost")
while True:
    try:
        o.do_handshake()
        break
    except ssl.SSLWantReadError:
        s.sendall(out.read())
        inc.write(s.recv(65536))
try:
    o.unwrap()
except ssl.SSLWantReadError:
    pass
s.sendall(out.read())
s.recv(65536)
print("ok")
]])
    assert.equal("ok\n", out)
    H.wait_until(function() return res end)
    assert.same({true}, res)
  end))

  it("frees the SSL state of closed streams without waiting for a collection", async(function()
    local server, port = tls_serve(echo)
    finally(function() server:stop() end)
    collectgarbage("stop")
    finally(function() collectgarbage("restart") end)
    local before = require("tcpserver.core").tls_live()
    for _ = 1, 20 do
      local c = assert(tls_connect(port))
      c:write("x\n")
      assert.equal("x\n", c:read_until("\n"))
      c:close()
    end
    H.wait_until(function() return require("tcpserver.core").tls_live() <= before end)
    assert.is_true(require("tcpserver.core").tls_live() <= before)
  end))

  it("refuses start_tls as a client without a name to check", async(function()
    local server, port = tls_serve(echo)
    finally(function() server:stop() end)
    local c = H.connect(port)
    local ok, err = pcall(c.start_tls, c, false, {cafile = C.cafile})
    assert.is_false(ok)
    assert.matches("server_hostname", err)
    c:close()
    c = H.connect(port)
    assert.is_true(c:start_tls(false, {verify = "none"}))
    c:close()
  end))

  it("verifies client certificates on SNI contexts with verify = required", async(function()
    local server, port = tls_serve(echo, {sni = {["other.test"] = C.other}, verify = "required",
                                          cafile = C.cafile})
    finally(function() server:stop() end)
    local client_opts = {cafile = C.cafile, certfile = C.client.certfile, keyfile = C.client.keyfile}
    for _, name in ipairs {"other.test", "localhost"} do
      local c = assert(tls_connect(port, {ssl_options = client_opts, server_hostname = name}))
      c:write(name .. "\n")
      assert.equal(name .. "\n", c:read_until("\n"))
      c:close()
    end
  end))
end)

describe("sni_callback", function()
  local restore
  before_each(function() restore = select(2, H.capture_logs()) end)
  after_each(function() restore() end)

  it("picks the context by name, and stream:server_name() tells the name", async(function()
    local asked, names = {}, {}
    local other_ctx = ssl.context({certfile = C.other.certfile, keyfile = C.other.keyfile})
    local server, port = tls_serve(function(_, stream)
      assert(stream:wait_for_handshake())
      names[#names + 1] = stream:server_name() or "-"
      echo(_, stream)
    end, {sni_callback = function(name)
      asked[#asked + 1] = name
      if name == "other.test" then return other_ctx end
      if name == "table.test" then return {certfile = C.other.certfile, keyfile = C.other.keyfile} end
      if name == "boom.test" then error("no such tenant") end
    end})
    finally(function() server:stop() end)
    local c = assert(tls_connect(port, {server_hostname = "other.test"}))
    assert.equal("CN=other.test", c:peer_certificate().subject)
    assert.equal("other.test", c:server_name())
    c:close()
    c = assert(tls_connect(port, {server_hostname = "localhost"}))
    assert.equal("CN=localhost", c:peer_certificate().subject)
    c:close()
    c = assert(tls_connect(port, {ssl_options = {verify = "none"}, server_hostname = "table.test"}))
    assert.equal("CN=other.test", c:peer_certificate().subject)
    c:close()
    local bad, err = tls_connect(port, {server_hostname = "boom.test"})
    assert.is_nil(bad)
    assert.matches("^tls: .*internal error", err)
    H.wait_until(function() return #names == 3 end)
    assert.same({"other.test", "localhost", "table.test", "boom.test"}, asked)
    assert.same({"other.test", "localhost", "table.test"}, names)
  end))

  -- Python's ssl as the client: with no certificate, a self-signed one
  -- and one the CA signed, for each name.
  local function client_cert_results(port, names)
    return H.python([[
import socket, ssl, sys
port, ca, certs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def attempt(name, cert):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(certs + "/" + cert + ".pem", certs + "/" + cert + ".key")
    try:
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)
        s.sendall(b"hi\n")
        return "echo" if s.recv(100) == b"hi\n" else "refused"
    except (ssl.SSLError, OSError):
        return "refused"
for name in sys.argv[4:]:
    for cert in ("", "self", "client"):
        print(name, cert or "none", attempt(name, cert))
]], tostring(port), C.cafile, C.dir, table.unpack(names))
  end

  it("never verifies less than the server asks: verify = required holds on the "
     .. "context it returns, whatever that context says", async(function()
    local plain = ssl.context({certfile = C.other.certfile, keyfile = C.other.keyfile})
    local server, port = tls_serve(echo, {verify = "required", cafile = C.cafile,
                                          sni_callback = function(name)
      if name == "ctx.test" then return plain end
      if name == "none.test" then
        return {certfile = C.other.certfile, keyfile = C.other.keyfile, verify = "none"}
      end
      return {certfile = C.other.certfile, keyfile = C.other.keyfile}
    end})
    finally(function() server:stop() end)
    local out = client_cert_results(port, {"ctx.test", "none.test", "table.test"})
    local want = {}
    for _, name in ipairs {"ctx.test", "none.test", "table.test"} do
      want[#want + 1] = name .. " none refused\n" .. name .. " self refused\n" .. name .. " client echo\n"
    end
    assert.equal(table.concat(want), out)
  end))

  it("resumes no session on another name: a ticket got without a certificate on one name "
     .. "does not pass one that requires it", async(function()
    -- tickets are sealed with the main context's keys, and a resumed
    -- handshake asks for no certificate: strict.test let such a client in
    local server, port = tls_serve(echo, {sni_callback = function(name)
      if name == "strict.test" then
        return {certfile = C.other.certfile, keyfile = C.other.keyfile, verify = "required",
                cafile = C.cafile}
      end
    end})
    finally(function() server:stop() end)
    local out = H.python([[
import socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
def go(name, sess=None):
    try:
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name, session=sess)
        s.sendall(b"hi\n"); r = s.recv(100)
        print(name, "reused" if s.session_reused else "full", "echo" if r == b"hi\n" else "refused")
        return s.session
    except (ssl.SSLError, OSError):
        print(name, "refused"); return None
sess = go("open.test")
go("open.test", sess)      # the same name resumes
go("strict.test", sess)    # another name does not: a full handshake, which needs a certificate
]], tostring(port))
    assert.equal("open.test full echo\nopen.test reused echo\nstrict.test refused\n", out)
  end))

  it("lets a returned context verify more than the server asks", async(function()
    local server, port = tls_serve(echo, {sni_callback = function()
      return {certfile = C.other.certfile, keyfile = C.other.keyfile, verify = "required",
              cafile = C.cafile}
    end})
    finally(function() server:stop() end)
    assert.equal("strict.test none refused\nstrict.test self refused\nstrict.test client echo\n",
                 client_cert_results(port, {"strict.test"}))
  end))

  it("refuses a callback that is not a function", function()
    assert.has_error(function() ssl.context({sni_callback = "x"}) end)
  end)
end)

describe("TLS read backpressure", function()
  it("stops reading ciphertext while the handler does not read", async(function()
    local locks = require "tcpserver.locks"
    local go, total = locks.Event(), nil
    local n = 32 * 1024 * 1024
    local server, port = tls_serve(function(_, stream)
      go:wait()
      local got = 0
      while got < n do
        local chunk = assert(stream:read_bytes(64 * 1024, true))
        got = got + #chunk
      end
      total = got
    end, nil, {max_buffer_size = 64 * 1024})
    finally(function() server:stop() end)
    local c = assert(tls_connect(port))
    local chunk = ("b"):rep(1024 * 1024)
    c:set_timeout(0.5)
    local i, stalled = 0, false
    while i < n // #chunk do
      i = i + 1
      local ok, err = c:write(chunk) -- queued even when the wait times out
      if not ok then
        assert.equal("timeout", err)
        stalled = true
        break
      end
    end
    -- the server holds a few read chunks, not the 32 MiB the client has
    assert.is_true(stalled)
    assert.is_true(i < 16, i)
    c:set_timeout(nil)
    go:set()
    for _ = i + 1, n // #chunk do assert(c:write(chunk)) end
    assert.is_true(c:flush())
    H.wait_until(function() return total end)
    assert.equal(n, total)
    c:close()
  end, 30))
end)

describe("TLS records held back at the end", function()
  -- Five records and the close_notify come in one segment while the
  -- client reads 10 bytes: the rest waits inside OpenSSL (the read was
  -- answered), and the end must wait for it. With the socket's EOF too,
  -- read_until_close got ""; without, it waited for an EOF (1f8f6a9 had
  -- no hold-back, 354d656 brought both).
  for _, fin in ipairs {true, false} do
    it(fin and "delivers them before the end, with the socket's EOF after"
           or "delivers them and the close_notify's end, with no EOF", async(function()
      local p = require("tcpserver.process").Subprocess({H.PYTHON, "-c", [[
import socket, ssl, sys, time
certdir, fin = sys.argv[1], sys.argv[2] == "fin"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(certdir + "/server.pem", certdir + "/server.key")
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ctx.wrap_bio(inc, out, server_side=True)
while True:
    try:
        o.do_handshake(); break
    except ssl.SSLWantReadError:
        if out.pending: c.sendall(out.read())
        d = c.recv(65536)
        if not d: sys.exit(1)
        inc.write(d)
if out.pending: c.sendall(out.read())
while True:                         # the client asks ("?"): it waits in read_bytes(10) now
    try:
        o.read(1); break
    except ssl.SSLWantReadError:
        inc.write(c.recv(65536))
for i in range(5): o.write(b"%d123456789" % i)
try: o.unwrap()
except ssl.SSLWantReadError: pass
c.sendall(out.read())               # five records and the close_notify in one write
if fin: time.sleep(0.1); c.shutdown(socket.SHUT_WR)
time.sleep(2)
]], C.dir, fin and "fin" or "nofin"}, {stdout = "pipe"})
      local port = tonumber(p.stdout:read_until("\n"))
      local s = assert(tcpclient.connect("127.0.0.1", port, {ssl_options = {cafile = C.cafile}}))
      s:write("?")
      assert.equal("0123456789", s:read_bytes(10))
      ioloop.sleep(0.3) -- the rest and the end arrive meanwhile
      local rest = {ioloop.with_timeout(1, function() return s:read_until_close() end)}
      p:kill()
      p:wait_for_exit()
      assert.same({"1123456789212345678931234567894123456789"}, rest)
    end))
  end
end)

describe("TLS and shutdown('send')", function()
  it("refuses a half-close over TLS for now, and the stream goes on", async(function()
    local res
    local server, port = tls_serve(function(_, stream)
      res = {stream:shutdown("send")}
      echo(_, stream)
    end)
    finally(function() server:stop() end)
    local c = assert(tls_connect(port))
    c:write("still\n")
    assert.equal("still\n", c:read_until("\n"))
    assert.same({nil, 'shutdown("send") is not supported over TLS yet'}, res)
    c:close()
  end))
end)

describe("capath", function()
  it("verifies against a hashed CA directory, on a client and for client certificates", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir .. " && cp " .. C.cafile .. " " .. dir .. "/ca.pem"
                      .. " && openssl rehash " .. dir .. " 2>/dev/null"))
    finally(function() os.execute("rm -rf " .. dir) end)
    local server, port = tls_serve(echo, {verify = "required", capath = dir})
    finally(function() server:stop() end)
    local c = assert(tls_connect(port, {ssl_options = {capath = dir, certfile = C.client.certfile,
                                                       keyfile = C.client.keyfile}}))
    c:write("capath\n")
    assert.equal("capath\n", c:read_until("\n"))
    assert.is_true(c:peer_certificate().verified)
    c:close()
    local bad, err = tls_connect(port, {ssl_options = {capath = "/etc/ssl/certs"}})
    assert.is_nil(bad)
    assert.matches("certificate verify failed", err)
  end))
end)

describe("wait_for_handshake and set_timeout", function()
  it("gives up waiting after set_timeout while the handshake goes on", async(function()
    local res
    local server, port = tls_serve(function(_, stream)
      stream:set_timeout(0.1)
      res = {stream:wait_for_handshake()}
      res[3] = stream:closed()
    end)
    finally(function() server:stop() end)
    local c = H.connect(port) -- plain TCP: no ClientHello comes
    H.wait_until(function() return res end)
    assert.same({nil, "timeout", false}, res)
    c:close()
  end))
end)

describe("session tickets", function()
  -- openssl s_client -msg shows each NewSessionTicket the server sends
  local function tickets(port)
    local out = H.run({"sh", "-c", "(printf 'x\\n'; sleep 0.5) | openssl s_client -connect 127.0.0.1:"
                       .. port .. " -tls1_3 -msg 2>&1"})
    local n = 0
    for _ in out:gmatch("NewSessionTicket") do n = n + 1 end
    return n
  end

  it("sends one TLS 1.3 ticket by default, and session_tickets sets how many", async(function()
    for want, opts in pairs {[1] = {}, [0] = {session_tickets = 0}, [3] = {session_tickets = 3}} do
      local server, port = tls_serve(echo, opts)
      local got = tickets(port)
      server:stop()
      assert.equal(want, got)
    end
    assert.has_error(function() ssl.context({session_tickets = 99}) end,
                     "ssl_options: session_tickets must be from 0 to 16")
  end))
end)
