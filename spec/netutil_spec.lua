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
    local out = H.unix_line(path, "over unix\n")
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

  it("binds a name in the abstract namespace", async(function()
    local name = "\0tcpserver-test-" .. os.time() .. "-" .. math.random(1e9)
    local sock = netutil.bind_unix_socket(name)
    assert.equal(name, (sock:getsockname()))
    local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
      stream:write("abstract: " .. stream:read_until("\n"))
    end})
    local server = Echo()
    server:add_sockets({sock})
    local out = H.python([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("\0" + sys.argv[1])
s.sendall(b"hi\n")
sys.stdout.write(s.makefile("rb").readline().decode())
]], name:sub(2))
    server:stop()
    assert.equal("abstract: hi\n", out)
    assert.has_error(function() netutil.bind_unix_socket("a\0b") end)
  end))
end)

local P = require "spec.procs"
local locks = require "tcpserver.locks"

describe("netutil.bind_sockets reuse_port", function()
  it("defaults to netutil.default_reuse_port, and must be a boolean", function()
    finally(function() netutil.default_reuse_port = false end)
    netutil.default_reuse_port = true
    local a = netutil.bind_sockets(0, "127.0.0.1")[1]
    local _, port = a:getsockname()
    local b = netutil.bind_sockets(port, "127.0.0.1")[1]
    netutil.default_reuse_port = false
    assert.has_error(function() netutil.bind_sockets(port, "127.0.0.1") end)
    assert.has_error(function() netutil.bind_sockets(0, "127.0.0.1", {reuse_port = 1}) end,
                     "bind_sockets: reuse_port must be a boolean")
    a:close(); b:close()
  end)
end)

describe("netutil.inherited_sockets", function()
  it("is an empty list when nothing was passed, and sockets have no name", function()
    assert.is_nil(os.getenv("LISTEN_FDS"))
    assert.same({}, netutil.inherited_sockets())
    local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
    assert.is_nil(sock.name)
    assert.is_function(sock.getsockname)
    assert.matches("^tcpserver.socket %(fd %d+%)$", tostring(sock))
    sock:close()
  end)
  -- With real sockets passed the systemd way: see host_spec.lua.
end)

describe("a stream over a unix socket", function()
  local path = os.tmpname()
  after_each(function() os.remove(path) end)

  local function serve(handler)
    os.remove(path)
    local server = tcpserver.TCPServer:extend({handle_stream = handler})()
    server:add_sockets({netutil.bind_unix_socket(path)})
    return server
  end

  it("supports the whole stream API", async(function()
    local got, closed = {}, locks.Event()
    local server = serve(function(_, stream, address)
      got.address = tostring(address)
      got.sockname = {stream:getsockname()}
      got.peername = {stream:getpeername()}
      stream:set_nodelay(true) -- nothing to do on a pipe, and no error
      got.handshake = {stream:wait_for_handshake()}
      got.tls = {stream:tls_version(), stream:peer_certificate(), stream:alpn_protocol()}
      stream:set_close_callback(function() closed:set() end)
      stream:settimeout(5)
      got.line = stream:read_until("\n")
      got.bytes = stream:read_bytes(4)
      got.partial = stream:read_bytes(100, true)
      assert(stream:write({"two ", "parts\n"}))
      assert(stream:flush())
      local unread, unsent = stream:buffer_sizes()
      got.sizes = {unread, unsent}
      stream:settimeout(0.05)
      got.timeout = {stream:read_until("\n")}
      got.open_after_timeout = not stream:closed()
      stream:write("timed out\n")
      stream:settimeout(nil)
      got.more = stream:read_until("\n")
      got.rest = stream:read_until_close()
      got.closed = stream:closed()
      got.write_closed = {stream:write("late")}
    end)
    local out = P.python([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
s.sendall(b"line\nabcdXYZ")
out = [f.readline(), f.readline()]
s.sendall(b"more\nrest of it")
s.shutdown(socket.SHUT_WR)
out.append(f.read())
sys.stdout.write(b"".join(out).decode())
]], path)
    server:stop()
    assert.equal("two parts\ntimed out\n", out)
    assert.same({
      address = "unix:", sockname = {path, 0, "unix"}, peername = {"", 0, "unix"},
      handshake = {true}, tls = {}, line = "line\n", bytes = "abcd", partial = "XYZ",
      sizes = {0, 0}, timeout = {nil, "timeout"}, open_after_timeout = true,
      more = "more\n", rest = "rest of it", closed = true, write_closed = {nil, "closed"},
    }, got)
    assert.is_true(closed:wait(5))
  end))

  it("is closed by a line over max_bytes", async(function()
    local got = {}
    local server = serve(function(_, stream)
      got[#got + 1] = {stream:read_until("\n", 4)}
      got[#got + 1] = stream:closed()
    end)
    local out = P.python([[
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"0123456789\n")
sys.stdout.write(repr(s.recv(10)))
]], path)
    server:stop()
    assert.equal("b''", out)
    assert.same({{nil, "too large"}, true}, got)
  end))
end)

describe("netutil.bind_sockets errors", function()
  it("say why in one line, with no position inside the library", function()
    local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
    local _, port = sock:getsockname()
    local ok, err = pcall(netutil.bind_sockets, port, "127.0.0.1")
    sock:close()
    assert.is_false(ok)
    assert.equal("bind_sockets: cannot listen on 127.0.0.1:" .. port .. ": Address already in use", err)
  end)
end)
