local H = require "spec.helper"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"

local async = H.async
local LUAHOST = "build/luahost"

-- Starts `luahost script args...`; the script prints its port on stdout.
local function start(script, ...)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(script)
  f:close()
  local p = process.Subprocess({LUAHOST, path, ...}, {stdout = "pipe", stderr = "pipe"})
  p.script = path
  return p
end

local ECHO = [[
local tcpserver = require "tcpserver"
local Echo = tcpserver.TCPServer:extend()
function Echo:handle_stream(stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    if line == "slow\n" then require("tcpserver.ioloop").sleep(0.2) end
    stream:write(line)
  end
end
local port = Echo():listen(0, "127.0.0.1")
io.stdout:write(port, " ", arg[1] or "", "\n")
io.stdout:flush()
]]

describe("luahost", function()
  it("runs a script with arg and serves until SIGTERM, then exits 0", async(function()
    local p = start(ECHO, "first-arg")
    local port, a1 = p.stdout:read_until("\n"):match("(%d+) (%S*)")
    assert.equal("first-arg", a1)
    local c = assert(tcpclient.connect("127.0.0.1", tonumber(port)))
    c:write("via luahost\n")
    assert.equal("via luahost\n", c:read_until("\n"))
    c:write("slow\n")
    H.wait_until(function() return select(2, c:buffer_sizes()) == 0 end)
    p:kill(15)
    assert.equal("slow\n", c:read_until("\n")) -- the running handler finishes
    c:close()
    assert.same({0, 0}, {p:wait_for_exit()})
    assert.same({nil, "connection refused"}, {tcpclient.connect("127.0.0.1", tonumber(port))})
    os.remove(p.script)
  end))

  it("stops on SIGINT too", async(function()
    local p = start(ECHO)
    p.stdout:read_until("\n")
    p:kill(2)
    assert.same({0, 0}, {p:wait_for_exit()})
    os.remove(p.script)
  end))

  it("exits when the script leaves nothing to do", async(function()
    local p = start([[print("done")]])
    assert.equal("done\n", p.stdout:read_until_close())
    assert.same({0, 0}, {p:wait_for_exit()})
    os.remove(p.script)
  end))

  it("prints the traceback of a script error and exits non-zero", async(function()
    local p = start([[local function f() error("script broke") end f()]])
    local err = p.stderr:read_until_close()
    local status = p:wait_for_exit()
    assert.equal(1, status)
    assert.matches("script broke", err)
    assert.matches("stack traceback", err)
    os.remove(p.script)
  end))

  it("documents its flags in --help and rejects unknown ones", async(function()
    local out, status = H.run({LUAHOST, "--help"})
    assert.equal(0, status)
    assert.matches("usage: luahost", out)
    local _, bad = H.run({LUAHOST, "--bogus", "x.lua"})
    assert.equal(2, bad)
  end))

  it("runs the echo example", async(function()
    local p = process.Subprocess({LUAHOST, "examples/echo.lua", "0"}, {stderr = "pipe"})
    local line = p.stderr:read_until("\n")
    local port = tonumber(line:match("127%.0%.0%.1:(%d+)"))
    assert.is_truthy(port, line)
    local c = assert(tcpclient.connect("127.0.0.1", port))
    c:write("echo example\n")
    assert.equal("echo example\n", c:read_until("\n"))
    c:close()
    p:kill(15)
    assert.same({0, 0}, {p:wait_for_exit()})
  end))
end)
