local H = require "spec.helper"

-- docs/guide.md stays true to the code: its Lua compiles, its HAProxy
-- configuration passes `haproxy -c`.
local function blocks(lang)
  local text = assert(io.open("docs/guide.md")):read("a")
  local found = {}
  for body in text:gmatch("\n```" .. lang .. "\n(.-)\n```") do found[#found + 1] = body end
  return found
end

describe("docs/guide.md", function()
  it("has Lua blocks that compile", function()
    local lua = blocks("lua")
    assert.is_true(#lua >= 6, #lua)
    for i, code in ipairs(lua) do
      assert(load(code, "=guide block " .. i))
    end
  end)

  it("has an HAProxy configuration that haproxy accepts", H.async(function()
    local cfg = blocks("haproxy")
    assert.equal(1, #cfg)
    local path = H.script_file(cfg[1] .. "\n")
    local out, status, _, err = H.run({"haproxy", "-c", "-f", path})
    os.remove(path)
    assert.equal(0, status, out .. (err or ""))
  end))
end)
