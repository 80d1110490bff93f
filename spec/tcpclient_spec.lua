local H = require "spec.helper"
local tcpclient = require "tcpserver.tcpclient"
local netutil = require "tcpserver.netutil"

local async = H.async

describe("tcpclient.connect", function()
  it("connects, writes and reads", async(function()
    local server, port = H.serve(function(_, stream) stream:write(stream:read_until("\n")) end)
    local stream = assert(tcpclient.connect("localhost", port, {timeout = 5}))
    stream:write("hi\n")
    assert.equal("hi\n", stream:read_until("\n"))
    stream:close()
    server:stop()
  end))

  it("reports a refused connection", async(function()
    local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
    local _, port = sock:getsockname()
    sock:close()
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", port)})
  end))

  it("reports a name that does not resolve", async(function()
    local stream, err = tcpclient.connect("no-such-host.invalid", 80, {timeout = 5})
    assert.is_nil(stream)
    assert.matches("^cannot resolve no%-such%-host.invalid", err)
  end))

  it("times out on a server that never accepts", async(function()
    -- A listener with a full backlog leaves new connects unanswered.
    local sock = netutil.bind_sockets(0, "127.0.0.1", {backlog = 1})[1]
    local _, port = sock:getsockname()
    local held, result = {}, nil
    for _ = 1, 20 do
      local s, err = tcpclient.connect("127.0.0.1", port, {timeout = 0.2})
      if not s then result = err break end
      held[#held + 1] = s
    end
    for _, s in ipairs(held) do s:close() end
    sock:close()
    assert.equal("timeout", result)
  end))

  it("binds the source address when asked", async(function()
    local peer
    local server, port = H.serve(function(_, stream, address) peer = address.host; stream:close() end)
    local stream = assert(tcpclient.connect("127.0.0.1", port, {source_ip = "127.0.0.2"}))
    stream:read_until_close()
    server:stop()
    assert.equal("127.0.0.2", peer)
  end))

  it("rejects bad arguments clearly", function()
    assert.has_error(function() tcpclient.connect("", 1) end, "connect: host must be a non-empty string")
    assert.has_error(function() tcpclient.connect("x", 0) end, "connect: port must be an integer from 1 to 65535")
    assert.has_error(function() tcpclient.connect("x", 1, {tmeout = 1}) end, "connect: unknown option 'tmeout'")
  end)

  it("raises outside a task", function()
    local ok, err = pcall(tcpclient.connect, "127.0.0.1", 1)
    assert.is_false(ok)
    assert.matches("must be called from a coroutine run by the loop", err)
  end)
end)

describe("tcpclient.connect to a unix socket", function()
  local tcpserver = require "tcpserver"

  it("connects with host 'unix:/path' and no port", async(function()
    local path = os.tmpname()
    os.remove(path)
    local server = tcpserver.TCPServer:extend({handle_stream = function(_, stream, address)
      stream:write(address.family .. " " .. stream:read_until("\n"))
    end})()
    server:add_sockets({netutil.bind_unix_socket(path)})
    local stream = assert(tcpclient.connect("unix:" .. path, nil, {timeout = 5}))
    stream:write("over unix\n")
    assert.equal("unix over unix\n", stream:read_until("\n"))
    stream:close()
    server:stop()
    os.remove(path)
  end))

  it("reports a missing socket and refuses a port", async(function()
    local stream, err = tcpclient.connect("unix:/nonexistent/tcpserver.sock")
    assert.is_nil(stream)
    assert.equal("no such file or directory", err)
    assert.has_error(function() tcpclient.connect("unix:/x.sock", 80) end,
                     "connect: a unix socket (unix:/x.sock) takes no port")
  end))
end)
