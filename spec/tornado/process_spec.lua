-- Port of Tornado's tornado/test/process_test.py (Tornado 6.x, master).
-- Tornado's class names are the describe() names and its test names the
-- it() names. test_multi_process runs its script under build/luahost
-- (spec/procs.lua), as Tornado runs it in a fresh interpreter; the busted
-- process itself never forks.
--
-- Skipped, and why:
--   SubprocessTest.test_sigchild: set_exit_callback is not in the API
--     (wait_for_exit is: test_sigchild_future).
--   SubprocessTest.test_wait_for_exit_raise: errors are values here;
--     wait_for_exit returns the exit status and never raises
--     (test_wait_for_exit_raise_disabled checks that status).
-- Translated: test_multi_process's HTTP server and client become a line
-- protocol ("exit N", "pid") over TCPServer and tcpclient; Tornado's
-- stderr=subprocess.STDOUT is `sh -c 'exec ... 2>&1'` (Subprocess has no
-- such option); returncode -SIGTERM is wait_for_exit's (0, 15).
local H = require "spec.helper"
local P = require "spec.procs"
local process = require "tcpserver.process"

local async = H.async

describe("ProcessTest", function()
  after_each(P.cleanup)

  it("test_multi_process", async(function()
    -- Tasks 0 and 1 serve; task 2 is the client that makes them exit with
    -- status 2 and 3 (restarted), 0 (not restarted) and 4 (restarted, with
    -- a new pid), then exits 0 itself.
    local p = P.luahost([[
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local netutil = require "tcpserver.netutil"
local process = require "tcpserver.process"
local tcpclient = require "tcpserver.tcpclient"

local sock = netutil.bind_sockets(0, "127.0.0.1")[1]
local _, port = sock:getsockname()
local id = process.fork_processes(3, 3)
assert(id ~= nil)
if id == 0 or id == 1 then
  assert(id == process.task_id())
  local Server = tcpserver.TCPServer:extend()
  function Server:handle_stream(stream)
    local line = stream:read_until("\n")
    local code = line and line:match("^exit (%d+)")
    -- As os._exit in Tornado's handler: no reply.
    if code then os.exit(tonumber(code)) end
    stream:write(process.getpid() .. "\n")
  end
  Server():add_sockets({sock})
elseif id == 2 then
  assert(id == process.task_id())
  sock:close()
  ioloop.current():run_sync(function()
    local function fetch(line, fail_ok)
      local c = assert(tcpclient.connect("127.0.0.1", port, {timeout = 5}))
      c:write(line .. "\n")
      local reply, err = c:read_until("\n")
      c:close()
      if not reply and not fail_ok then error("fetch " .. line .. ": " .. err) end
      return reply and tonumber(reply)
    end
    -- Two processes exit abnormally; they are restarted, so a new fetch works.
    fetch("exit 2", true)
    fetch("exit 3", true)
    assert(fetch("pid"))
    -- One exits normally: it is not restarted. The one left gets a new
    -- pid when it exits abnormally.
    fetch("exit 0", true)
    local pid = fetch("pid")
    fetch("exit 4", true)
    local pid2 = fetch("pid")
    assert(pid ~= pid2, "the restarted process has the same pid")
    -- The last one exits normally so that the supervisor is done.
    fetch("exit 0", true)
    print("client done")
  end, 8)
  os.exit(0)
end
]])
    local err = p.err:all()
    assert.same({0, 0}, {p:wait()}, table.concat(err, "\n"))
    assert.same({"client done"}, p.out:all())
    -- Tornado's ExpectLog: "Starting .* processes|child .* exited".
    local text = table.concat(err, "\n")
    assert.matches("Starting 3 processes", text)
    assert.matches("child %d %(pid %d+%) exited with status 2, restarting", text)
    assert.matches("child %d %(pid %d+%) exited with status 3, restarting", text)
    assert.matches("child %d %(pid %d+%) exited with status 4, restarting", text)
    assert.matches("child 2 %(pid %d+%) exited normally", text)
  end))
end)

describe("SubprocessTest", function()
  local procs = {}
  after_each(function()
    -- term_and_wait: what a test left running is stopped.
    for _, p in ipairs(procs) do p:kill(9) end
    procs = {}
  end)

  local function start(argv, opts)
    local p = process.Subprocess(argv, opts)
    procs[#procs + 1] = p
    return p
  end

  -- Python's interactive prompt goes to stderr: merged into stdout.
  local function interactive_python()
    return start({"sh", "-c", "exec \"$0\" -u -i -I 2>&1", H.PYTHON}, {stdin = "pipe", stdout = "pipe"})
  end

  it("test_subprocess", async(function()
    local subproc = interactive_python()
    assert(subproc.stdout:read_until(">>> "))
    subproc.stdin:write("print('hello')\n")
    assert.equal("hello\n", subproc.stdout:read_until("\n"))
    assert(subproc.stdout:read_until(">>> "))
    subproc.stdin:write("raise SystemExit\n")
    assert.equal("", subproc.stdout:read_until_close())
    assert.same({0, 0}, {subproc:wait_for_exit()})
  end))

  it("test_close_stdin", async(function()
    -- Closing the parent's end of stdin: the child sees EOF.
    local subproc = interactive_python()
    assert(subproc.stdout:read_until(">>> "))
    subproc.stdin:close()
    assert.equal("\n", subproc.stdout:read_until_close())
    assert.same({0, 0}, {subproc:wait_for_exit()})
  end))

  it("test_stderr", async(function()
    local subproc = start({H.PYTHON, "-u", "-c", "import sys; sys.stderr.write('hello\\n')"},
                          {stderr = "pipe"})
    assert.equal("hello\n", subproc.stderr:read_until("\n"))
    subproc.stderr:close()
    assert.same({0, 0}, {subproc:wait_for_exit()})
  end))

  it("test_sigchild_future", async(function()
    local subproc = start({H.PYTHON, "-c", "pass"})
    assert.same({0, 0}, {subproc:wait_for_exit()})
  end))

  it("test_sigchild_signal", async(function()
    local subproc = start({H.PYTHON, "-c", "import time; time.sleep(30)"}, {stdout = "pipe"})
    assert.is_true(subproc:kill(15) ~= false)
    assert.same({0, 15}, {subproc:wait_for_exit()})
    -- The child's stdout closed with it.
    assert.equal("", subproc.stdout:read_until_close())
  end))

  it("test_wait_for_exit_raise_disabled", async(function()
    local subproc = start({H.PYTHON, "-c", "import sys; sys.exit(1)"})
    assert.same({1, 0}, {subproc:wait_for_exit()})
  end))
end)
