local H = require "spec.helper"
local log = require "tcpserver.log"
local process = require "tcpserver.process"

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
    assert.has_error(function() log.set_level("loud") end,
                     "log.set_level: unknown level 'loud' (debug, info, warning, error)")
    assert.has_error(function() log.log("loud", "x") end, "log: unknown level 'loud'")
  end)

  -- Runs `body` with io.stderr replaced; returns what was written.
  local function stderr_of(body)
    local lines = {}
    local stderr = io.stderr
    io.stderr = {write = function(_, ...) lines[#lines + 1] = table.concat({...}) end} -- luacheck: ignore 122
    local ok, err = pcall(body)
    io.stderr = stderr -- luacheck: ignore 122
    assert(ok, err)
    return lines
  end

  it("writes lines with an ISO-8601 UTC time, the level and the pid to stderr", function()
    local before = os.date("!%Y-%m-%dT%H:%M")
    local lines = stderr_of(function() log.warning("to stderr") end)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ WARNING %[" .. process.getpid() .. "%] to stderr\n$",
                   lines[1])
    -- the minute at the call (or the next one, if it ticked over)
    local minute = lines[1]:sub(1, 16)
    assert.is_true(minute == before or minute == os.date("!%Y-%m-%dT%H:%M"), lines[1])
  end)

  it("writes JSON lines after set_format('json'), escaping the message", H.async(function()
    log.set_format("json")
    local lines = stderr_of(function() log.error('a "quoted"\tline\n%s', "x\1") end)
    log.set_format("text")
    local out = H.python([[
import json, sys
d = json.loads(sys.argv[1])
print(sorted(d), d["level"], d["pid"], repr(d["message"]), d["time"][-1])
]], lines[1])
    assert.equal(("['level', 'message', 'pid', 'time'] error %d 'a \"quoted\"\\tline\\nx\\x01' Z\n")
                 :format(process.getpid()), out)
    assert.has_error(function() log.set_format("xml") end, "log.set_format: unknown format 'xml' (text, json)")
  end))

  it("adds the task id in a forked worker, in both formats", H.async(function()
    local script = H.script_file([[
local log = require "tcpserver.log"
local process = require "tcpserver.process"
local id = process.fork_processes(1, 0)
log.info("text line")
log.set_format("json")
log.info("json line")
os.exit(id == 0 and 0 or 3)
]])
    local p = process.Subprocess({H.LUAHOST, script}, {stderr = "pipe"})
    local err = p.stderr:read_until_close()
    assert.same({0, 0}, {p:wait_for_exit()})
    os.remove(script)
    local text = err:match("[^\n]* INFO %[%d+/0%] text line")
    assert.is_truthy(text, err)
    local child = text:match("%[(%d+)/0%]")
    assert.matches('{"time":"[^"]+Z","level":"info","pid":' .. child .. ',"task":0,"message":"json line"}', err)
    -- the supervisor's own lines carry no task id
    assert.matches("INFO %[%d+%] Starting 1 processes", err)
  end))

  it("passes messages to a lualogging logger (Debian's lua-logging)", function()
    local saved = package.path
    package.path = package.path .. ";/usr/share/lua/5.2/?.lua;/usr/share/lua/5.1/?.lua"
    local logging = require "logging"
    package.path = saved
    local seen = {}
    local logger = logging.new(function(_, level, message)
      seen[#seen + 1] = level .. " " .. message
      return true
    end)
    logger:setLevel(logging.DEBUG)
    seen = {}
    log.set_handler(log.lualogging(logger))
    log.set_level("debug")
    log.debug("d")
    log.info("100%% %s", "sure")
    log.warning("w %s")
    log.error("e")
    assert.same({"DEBUG d", "INFO 100% sure", "WARN w %s", "ERROR e"}, seen)
  end)
end)
