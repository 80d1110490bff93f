local H = require "spec.helper"
local process = require "tcpserver.process"

local async = H.async

describe("process", function()
  it("cpu_count is a positive integer", function()
    local n = process.cpu_count()
    assert.is_true(math.type(n) == "integer" and n >= 1)
  end)

  it("raise_fd_limit returns the descriptor limit", function()
    assert.is_true(process.raise_fd_limit() >= 1024)
  end)

  describe("Subprocess", function()
    it("streams stdin and stdout of a child", async(function()
      local p = process.Subprocess({"cat"}, {stdin = "pipe", stdout = "pipe"})
      assert.is_true(p.pid > 0)
      p.stdin:write("through cat\n")
      assert.equal("through cat\n", p.stdout:read_until("\n"))
      p.stdin:close()
      assert.equal("", p.stdout:read_until_close())
      assert.same({0, 0}, {p:wait_for_exit()})
    end))

    it("reports the exit status and the terminating signal", async(function()
      local _, status = H.run({"sh", "-c", "exit 3"})
      assert.equal(3, status)
      local p = process.Subprocess({"sleep", "10"})
      p:kill(9)
      assert.same({0, 9}, {p:wait_for_exit()})
    end))

    it("passes the environment when given", async(function()
      local out = H.run({"sh", "-c", "echo $GREETING"}, nil, {GREETING = "hi", PATH = os.getenv("PATH")})
      assert.equal("hi\n", out)
    end))

    it("raises for a program that does not exist, and for bad options", function()
      assert.has_error(function() process.Subprocess({"/no/such/program"}) end)
      assert.has_error(function() process.Subprocess({}) end, "Subprocess: argv must be a non-empty list of strings")
      assert.has_error(function() process.Subprocess({"cat"}, {stdin = "file"}) end,
                       'Subprocess: stdin must be "pipe", "null" or nil')
    end)
  end)
end)
