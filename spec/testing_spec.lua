local H = require "spec.helper"
local testing = require "tcpserver.testing"
local ioloop = require "tcpserver.ioloop"

describe("testing", function()
  it("async runs the body as a task and returns its results", function()
    local f = testing.async(function(a) ioloop.sleep(0); return a * 2 end)
    assert.equal(42, f(21))
  end)

  it("async fails a body that runs past its timeout", function()
    local f = testing.async(function() ioloop.sleep(0.5) end, 0.02)
    assert.has_error(f)
  end)

  it("async lets assertion failures through", function()
    local f = testing.async(function() assert.equal(1, 2) end)
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.matches("Expected objects to be equal", tostring(err))
  end)

  it("bind_unused_port gives a listening socket and its port", H.async(function()
    local sock, port = testing.bind_unused_port()
    assert.is_true(port > 0)
    assert.equal(port, select(2, sock:getsockname()))
    local server = require("tcpserver").TCPServer:extend({handle_stream = function(_, s) s:write("up\n") end})()
    server:add_sockets({sock})
    assert.equal("up\n", H.connect(port):read_until("\n"))
    server:stop()
  end))
end)
