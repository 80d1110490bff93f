-- Port of Tornado's tornado/test/netutil_test.py (Tornado 6.x, master).
-- Tornado's class names are the describe() names and its test names the
-- it() names.
--
-- The API has no Resolver object: names are resolved by tcpclient.connect
-- (libuv's getaddrinfo on its thread pool, i.e. Tornado's
-- ThreadedResolver) and by bind_sockets. The resolver tests go through
-- those, once, under ThreadedResolverTest / ThreadedResolverErrorTest.
--
-- Skipped, and why:
--   BlockingResolverTest, BlockingResolverErrorTest, CaresResolverTest:
--     there is one resolver, not a choice of them (ThreadedResolver* cover it).
--   OverrideResolverTest.test_resolve_multiaddr (and its test_localhost):
--     no OverrideResolver / resolver mapping in the API.
--   ThreadedResolverImportTest.test_import: a deadlock on Python's import
--     lock; Lua's require has none.
--   IsValidIPTest.test_is_valid_ip: no is_valid_ip in the API.
-- Translated: test_bad_host expects nil, "cannot resolve ..." where Tornado
-- expects an IOError.
local H = require "spec.helper"
local netutil = require "tcpserver.netutil"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async

describe("ThreadedResolverTest", function()
  it("test_localhost", async(function()
    -- localhost resolves to a loopback address: 127.0.0.1 or ::1.
    local peer
    local server, port = H.serve(function(_, stream, address)
      peer = address
      stream:write("ok\n")
    end)
    local stream = assert(tcpclient.connect("localhost", port))
    assert.equal("ok\n", stream:read_until("\n"))
    stream:close()
    server:stop()
    assert.is_true(peer.host == "127.0.0.1" or peer.host == "::1", tostring(peer))
  end))
end)

describe("ThreadedResolverErrorTest", function()
  it("test_bad_host", async(function()
    local stream, err = tcpclient.connect("an invalid domain", 80)
    assert.is_nil(stream)
    assert.matches("^cannot resolve an invalid domain", err)
  end))
end)

describe("TestPortAllocation", function()
  it("test_same_port_allocation", function()
    local sockets = netutil.bind_sockets(0, "localhost")
    local _, port = sockets[1]:getsockname()
    assert.is_true(port > 0)
    for i = 2, #sockets do
      assert.equal(port, select(2, sockets[i]:getsockname()))
    end
    for _, sock in ipairs(sockets) do sock:close() end
  end)

  it("test_reuse_port", function()
    local sock = netutil.bind_sockets(0, "127.0.0.1", {reuse_port = true})[1]
    local _, port = sock:getsockname()
    local sockets = netutil.bind_sockets(port, "127.0.0.1", {reuse_port = true})
    assert.is_true(#sockets >= 1)
    for _, s in ipairs(sockets) do
      assert.equal(port, select(2, s:getsockname()))
      s:close()
    end
    sock:close()
  end)
end)
