local H = require "spec.helper"

-- The rock installs a working module and luahost from a copy of the tree,
-- and lists every module under lua/tcpserver.
describe("rockspec", function()
  it("installs with luarocks make and works from lua5.4", H.async(function()
    local dir = os.tmpname()
    os.remove(dir)
    local script = [[
set -e
mkdir -p "$1/src" && cp -r src lua include rockspec "$1/src/"
cd "$1/src"
luarocks --lua-version 5.4 make --tree "$1/tree" rockspec/tcpserver-scm-1.rockspec >"$1/build.log" 2>&1
eval "$(luarocks --lua-version 5.4 path --tree "$1/tree")"
cd /
for f in "$OLDPWD"/lua/tcpserver/*.lua; do
  m=$(basename "$f" .lua); [ "$m" = init ] && m=tcpserver || m=tcpserver.$m
  lua5.4 -e "require '$m'" || { echo "cannot require $m"; exit 1; }
done
lua5.4 -e '
local tcpserver = require "tcpserver"
local tcpclient = require "tcpserver.tcpclient"
local S = tcpserver.TCPServer:extend({handle_stream = function(_, s) s:write(s:read_until("\n")) end})
local server = S()
local port = server:listen(0, "127.0.0.1")
print(require("tcpserver.ioloop").current():run_sync(function()
  local c = assert(tcpclient.connect("127.0.0.1", port))
  c:write("installed\n")
  return c:read_until("\n")
end, 10))'
"$1/tree/bin/luahost" --help | head -n 1
]]
    local out, status = H.run({"bash", "-c", script, "rockspec", dir})
    H.run({"rm", "-rf", dir})
    assert.equal(0, status, out)
    assert.equal("installed\n\nusage: luahost [options] script.lua [args...]\n", out)
  end, 120))
end)
