local H = require "spec.helper"
require "tcpserver.iostream"

-- make docs: the LDoc reference covers every stream method the C core
-- registers, and the man page renders without warnings.
describe("make docs", function()
  it("writes an API reference that documents every IOStream method, the C ones too", H.async(function()
    local dir = os.tmpname()
    os.remove(dir)
    local out, status, _, err = H.run({"make", "-s", "docs", "DOCS_DIR=" .. dir})
    assert.equal(0, status, out .. (err or ""))
    local index = assert(io.open(dir .. "/index.html")):read("a")
    local page = assert(io.open(dir .. "/classes/IOStream.html")):read("a")
    H.run({"rm", "-rf", dir})
    for _, m in ipairs {"tcpserver", "tcpserver.ssl", "tcpserver.log", "tcpserver.ioloop", "IOStream"} do
      assert.matches(m:gsub("%.", "%%.") .. "</a>", index)
    end
    local methods = {}
    for name in pairs(require("tcpserver.core").stream_mt.__index) do
      if not name:match("^_") then methods[#methods + 1] = name end
    end
    table.sort(methods)
    assert.is_true(#methods >= 15, #methods)
    for _, name in ipairs(methods) do
      assert.matches('<a name = "IOStream:' .. name .. '"></a>', page, nil, true)
    end
    assert.matches("RFC 2253", page)
  end))

  it("installs a man page for luahost that man renders cleanly", H.async(function()
    local out, status, _, err = H.run({"groff", "-man", "-Tutf8", "-ww", "docs/luahost.1"})
    assert.equal(0, status)
    assert.equal("", err)
    for _, flag in ipairs {"--version", "--workers", "--log-level", "--log-format", "--stats-port", "SIGHUP"} do
      assert.is_truthy(out:gsub("\27%[[%d;]*m", ""):gsub(".\8", ""):find(flag, 1, true), flag)
    end
  end))
end)
