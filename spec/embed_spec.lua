-- include/tcpserver.h as an embedding API: a C program with its own libuv
-- loop hands it to the core (ts_set_loop), runs a script that listens, and
-- drives the loop itself; the core serves a connection on it and leaves no
-- handle behind once the Lua state is closed.
local H = require "spec.helper"

local async = H.async

local BUILD = os.getenv("TS_BUILD") or "build"

local SCRIPT = [[
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local tcpserver = require "tcpserver"
local Echo = tcpserver.TCPServer:extend()
local server = Echo()
function Echo:handle_stream(stream)
  stream:write("embedded: " .. assert(stream:read_until("\n")))
  server:stop() -- then nothing is left for the host's loop to run
end
io.stdout:write(server:listen(0, "127.0.0.1"), "\n")
io.stdout:flush()
]]

local function compile(dir)
  local exe = dir .. "/host"
  local cmd = table.concat({
    "cc -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Iinclude -I/usr/include/lua5.4",
    "spec/embed/host.c", BUILD .. "/libtcpserver.a", "-o", exe,
    "-llua5.4 -luv -lssl -lcrypto -lm -ldl",
    os.getenv("TS_EMBED_LDFLAGS") or "",
  }, " ")
  assert(os.execute(cmd), "cannot build the embedding host: " .. cmd)
  return exe
end

describe("embedding the core in a C host", function()
  it("serves a connection on the host's own loop and closes cleanly", async(function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir))
    local exe = compile(dir)
    local script = H.script_file(SCRIPT)
    local process = require "tcpserver.process"
    local p = process.Subprocess({exe, script}, {stdout = "pipe"})
    local port = tonumber(assert(p.stdout:read_until("\n")))
    local c = H.connect(port)
    c:write("hello\n")
    assert.equal("embedded: hello\n", c:read_until("\n"))
    c:close()
    assert.equal("host: clean exit\n", p.stdout:read_until_close())
    assert.equal(0, (p:wait_for_exit()))
    os.remove(script)
    os.execute("rm -rf " .. dir)
  end))
end)
