local H = require "spec.helper"
local netutil = require "tcpserver.netutil"
local tcpserver = require "tcpserver"

local async = H.async

describe("netutil.bind_sockets", function()
  it("binds 127.0.0.1 with a kernel-chosen port", function()
    local socks = netutil.bind_sockets(0, "127.0.0.1")
    assert.equal(1, #socks)
    local host, port, family = socks[1]:getsockname()
    assert.equal("127.0.0.1", host)
    assert.is_true(port > 0)
    assert.equal("inet", family)
    assert.is_true(socks[1]:fileno() >= 0)
    socks[1]:close()
    socks[1]:close()
    assert.equal(-1, socks[1]:fileno())
  end)

  it("binds every family on the same port for a nil address", function()
    local socks = netutil.bind_sockets(0)
    assert.is_true(#socks >= 1)
    local _, port = socks[1]:getsockname()
    local families = {}
    for _, s in ipairs(socks) do
      local _, p, family = s:getsockname()
      assert.equal(port, p)
      families[family] = true
      s:close()
    end
    assert.is_true(families.inet)
  end)

  it("binds IPv6 only with family inet6", function()
    local ok, socks = pcall(netutil.bind_sockets, 0, "::1", {family = "inet6"})
    if not ok then pending("no IPv6 on this host: " .. socks) return end
    local host, _, family = socks[1]:getsockname()
    assert.same({"::1", "inet6"}, {host, family})
    socks[1]:close()
  end)

  it("lets several sockets share a port with reuse_port", function()
    local a = netutil.bind_sockets(0, "127.0.0.1", {reuse_port = true})[1]
    local _, port = a:getsockname()
    local b = netutil.bind_sockets(port, "127.0.0.1", {reuse_port = true})[1]
    assert.equal(port, select(2, b:getsockname()))
    assert.has_error(function() netutil.bind_sockets(port, "127.0.0.1") end)
    a:close(); b:close()
  end)

  it("rejects bad arguments clearly", function()
    assert.has_error(function() netutil.bind_sockets(70000) end,
                     "bind_sockets: port must be an integer from 0 to 65535")
    assert.has_error(function() netutil.bind_sockets(0, "127.0.0.1", {family = "ipx"}) end,
                     'bind_sockets: family must be "inet", "inet6" or nil')
    assert.has_error(function() netutil.bind_sockets(0, "127.0.0.1", {colour = 1}) end,
                     "bind_sockets: unknown option 'colour'")
    local ok, err = pcall(netutil.bind_sockets, 0, "no-such-host.invalid")
    assert.is_false(ok)
    assert.matches("cannot resolve no%-such%-host.invalid", err)
  end)

  it("refuses to close a socket a server uses", function()
    local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
    local server = tcpserver.TCPServer()
    server:add_socket(sock)
    assert.has_error(function() sock:close() end,
                     "socket is served by a server: stop the server instead")
    assert.has_error(function() server:add_socket(sock) end)
    server:stop()
  end)
end)

describe("netutil.bind_unix_socket", function()
  local path = os.tmpname()
  after_each(function() os.remove(path) end)

  it("serves a unix socket and replaces a stale one", async(function()
    os.remove(path)
    local stale = netutil.bind_unix_socket(path)
    stale:close()
    local sock = netutil.bind_unix_socket(path, tonumber("660", 8))
    local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream, address)
      stream:write(tostring(address) .. " " .. stream:read_until("\n"))
    end})
    local server = Echo()
    server:add_sockets({sock})
    local out = H.python([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"over unix\n")
sys.stdout.write(s.makefile("rb").readline().decode())
]], path)
    server:stop()
    assert.equal("unix: over unix\n", out)
  end))

  it("refuses to remove a file that is not a socket", function()
    local f = assert(io.open(path, "w"))
    f:write("keep me")
    f:close()
    assert.has_error(function() netutil.bind_unix_socket(path) end,
                     "bind_unix_socket: " .. path .. " exists and is not a socket")
    assert.equal("keep me", io.open(path):read("a"))
  end)
end)
