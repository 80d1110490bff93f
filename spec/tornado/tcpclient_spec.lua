-- Port of Tornado's tornado/test/tcpclient_test.py (Tornado 6.x, master).
-- Tornado's class names are the describe() names and its test names the
-- it() names. connect() returns nil, err where Tornado raises.
--
-- Skipped, and why:
--   TCPClientTest.test_source_port_fail: connect has no source_port option.
--   TCPClientTest's af= argument: connect takes no address family; the
--     family is the server's (TestTCPServer binds "localhost" with it) and
--     the client's comes from the host it is given.
--   TestConnectorSplit (test_one_family, test_mixed) and ConnectorTest (all
--     17 tests): they drive the private _Connector (happy eyeballs) with fake
--     streams; the API has no such class.
--   test_connect_ipv6_dual and test_connect_unspec_ipv6 need "localhost" to
--     resolve to ::1 (Tornado's skipIfLocalhostV4): they are pending where it
--     does not; test_connect_ipv6_ipv6 binds ::1 itself.
-- Translated: test_connect_timeout cannot give connect a resolver that never
-- answers; the step that never ends is the TLS handshake instead (a server
-- that accepts and never answers the ClientHello), which the same timeout
-- covers. It expects nil, "timeout" where Tornado expects TimeoutError.
local H = require "spec.helper"
local locks = require "tcpserver.locks"
local netutil = require "tcpserver.netutil"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"
local testing = require "tcpserver.testing"

local async = H.async

-- Tornado's TestTCPServer: binds "localhost" (or `address`) with `family`
-- on port 0 and hands each stream to the spec.
local function start_server(family, address)
  local got, release = locks.Event(), locks.Event()
  local server = tcpserver.TCPServer:extend({handle_stream = function(self, stream)
    self.stream = stream
    got:set()
    release:wait()
  end})()
  local sockets = netutil.bind_sockets(0, address or "localhost", {family = family})
  server:add_sockets(sockets)
  local _, port = sockets[1]:getsockname()
  return port, function()
    assert(got:wait(5), "the server got no connection")
    return server.stream
  end, function()
    server:stop()
    release:set()
  end
end

-- Does "localhost" resolve to ::1 here? (Tornado's skipIfLocalhostV4.)
local function localhost_v6()
  local ok, socks = pcall(netutil.bind_sockets, 0, "localhost", {family = "inet6"})
  if not ok then return false end
  for _, s in ipairs(socks) do s:close() end
  return true
end

-- connect(host, port, opts) to a server bound with `family`; the server's
-- stream gets what the client writes.
local function do_test_connect(family, host, opts, address)
  local port, server_stream, stop = start_server(family, address)
  local stream, err = tcpclient.connect(host, port, opts)
  if not stream then
    stop()
    return nil, err
  end
  stream:write("hello")
  local data = server_stream():read_bytes(5)
  stream:close()
  stop()
  assert.equal("hello", data)
  return true
end

describe("TCPClientTest", function()
  it("test_connect_ipv4_ipv4", async(function()
    assert.is_true(do_test_connect("inet", "127.0.0.1"))
  end))

  it("test_connect_ipv4_dual", async(function()
    assert.is_true(do_test_connect("inet", "localhost"))
  end))

  it("test_connect_ipv6_ipv6", async(function()
    local ok, socks = pcall(netutil.bind_sockets, 0, "::1", {family = "inet6"})
    if not ok then pending("no IPv6 on this host: " .. socks) return end
    socks[1]:close()
    assert.is_true(do_test_connect("inet6", "::1", nil, "::1"))
  end))

  it("test_connect_ipv6_dual", async(function()
    if not localhost_v6() then pending("localhost does not resolve to ::1 here (Tornado skips too)") end
    assert.is_true(do_test_connect("inet6", "localhost"))
  end))

  it("test_connect_unspec_ipv4", async(function()
    assert.is_true(do_test_connect(nil, "127.0.0.1"))
  end))

  it("test_connect_unspec_ipv6", async(function()
    if not localhost_v6() then pending("localhost does not resolve to ::1 here (Tornado skips too)") end
    assert.is_true(do_test_connect(nil, "::1"))
  end))

  it("test_connect_unspec_dual", async(function()
    assert.is_true(do_test_connect(nil, "localhost"))
  end))

  it("test_refused_ipv4", async(function()
    local sock, port = testing.bind_unused_port()
    sock:close()
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", port)})
  end))

  it("test_source_ip_fail", async(function()
    -- 8.8.8.8 is not an address of this host: binding to it fails.
    assert.same({nil, "address not available"}, {do_test_connect("inet", "127.0.0.1", {source_ip = "8.8.8.8"})})
  end))

  it("test_source_ip_success", async(function()
    assert.is_true(do_test_connect("inet", "127.0.0.1", {source_ip = "127.0.0.1"}))
  end))

  it("test_connect_timeout", async(function()
    local timeout = 0.05
    local server, port = H.serve(function(_, stream)
      stream:read_until_close() -- never answers the ClientHello
    end)
    local stream, err = tcpclient.connect("127.0.0.1", port, {timeout = timeout, ssl_options = {verify = "none"}})
    server:stop()
    assert.same({nil, "timeout"}, {stream, err})
  end))
end)
