require "spec.helper"
local log = require "tcpserver.log"

describe("log", function()
  after_each(function()
    log.set_handler(nil)
    log.set_level("info")
  end)

  it("passes messages at or above the level to the handler", function()
    local seen = {}
    log.set_handler(function(level, msg) seen[#seen + 1] = level .. " " .. msg end)
    log.debug("hidden")
    log.info("n=%d", 3)
    log.warning("plain %s")
    log.error("e")
    assert.same({"info n=3", "warning plain %s", "error e"}, seen)
    log.set_level("debug")
    assert.equal("debug", log.get_level())
    log.debug("shown")
    assert.equal("debug shown", seen[4])
  end)

  it("rejects unknown levels", function()
    assert.has_error(function() log.set_level("loud") end, "log.set_level: unknown level 'loud'")
    assert.has_error(function() log.log("loud", "x") end, "log: unknown level 'loud'")
  end)

  it("writes timestamped lines to stderr by default", function()
    local lines = {}
    local stderr = io.stderr
    io.stderr = {write = function(_, ...) lines[#lines + 1] = table.concat({...}) end} -- luacheck: ignore 122
    log.warning("to stderr")
    io.stderr = stderr -- luacheck: ignore 122
    assert.matches("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d WARNING to stderr\n$", lines[1])
  end)
end)
