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

-- The commands that README.md's "Testing your server" runs, from the
-- fenced block after the marker comment.
local function readme_block()
  local readme = assert(io.open("README.md")):read("a")
  local block = readme:match("<!%-%- spec/rockspec_spec%.lua runs this block %-%->\n```sh\n(.-)```")
  assert(block, "README.md: the busted block is missing")
  -- the spec sets T itself
  return (("\n" .. block):gsub("\nT=[^\n]*", ""))
end

-- README.md's example spec, from the fenced block after its marker.
local function readme_spec()
  local readme = assert(io.open("README.md")):read("a")
  local block = readme:match("<!%-%- spec/rockspec_spec%.lua runs this spec %-%->\n```lua\n(.-)```")
  assert(block, "README.md: the example spec is missing")
  return block
end

describe("make rock", function()
  it("builds a .src.rock that installs offline into a clean tree, where busted runs a user's spec "
     .. "the way README.md says", H.async(function()
    local dir = os.tmpname()
    os.remove(dir)
    local script = [[
set -e
mkdir -p "$1/none" "$1/project/spec"
make -s rock >"$1/rock.log" 2>&1 || { cat "$1/rock.log"; exit 1; }
rock=$(ls "$PWD"/tcpserver-*.src.rock)
cd "$1"
# offline: no rock server to ask, and any download goes to a dead proxy
http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 \
  luarocks --lua-version 5.4 --only-server="$1/none" install --tree "$1/tree" "$rock" >"$1/install.log" 2>&1 \
  || { cat "$1/install.log"; exit 1; }
cat >project/spec/echo_spec.lua <<'LUA'
]] .. readme_spec() .. [[
LUA
cat >project/spec/where_spec.lua <<'LUA'
it("loads tcpserver from the tree", function()
  assert.matches("^" .. os.getenv("T"), package.searchpath("tcpserver", package.path))
end)
LUA
cd project
export T="$1/tree"
]] .. readme_block() .. [[
]]
    local out, status = H.run({"bash", "-c", script, "rock", dir})
    H.run({"rm", "-rf", dir})
    assert.equal(0, status, out)
    assert.matches("2 successes / 0 failures / 0 errors", out)
  end, 120))
end)

describe("make install", function()
  it("installs luahost, the modules and the man page under PREFIX, and says when PREFIX/bin "
     .. "is not on PATH", H.async(function()
    local dir = os.tmpname()
    os.remove(dir)
    local out, status, _, err = H.run({"make", "-s", "install", "PREFIX=" .. dir})
    assert.equal(0, status, err)
    assert.equal(("note: %s/bin is not on your PATH; add it to run luahost:\n"
                  .. "  export PATH=\"%s/bin:$PATH\"\n"):format(dir, dir), out)
    assert.is_truthy(io.open(dir .. "/share/man/man1/luahost.1"))
    local version = H.run({dir .. "/bin/luahost", "--version"})
    assert.equal("luahost (tcpserver) " .. require("tcpserver")._VERSION .. "\n", version)
    -- the installed luahost finds the installed modules, not this checkout's
    local where = H.run({dir .. "/bin/luahost", "-e", "print(package.searchpath('tcpserver', package.path))",
                         "/dev/null"})
    assert.equal(dir .. "/bin/../share/lua/5.4/tcpserver/init.lua\n", where)
    out = H.run({"make", "-s", "install", "PREFIX=" .. dir}, nil, {PATH = dir .. "/bin:" .. os.getenv("PATH")})
    assert.equal("", out)
    H.run({"rm", "-rf", dir})
  end, 60))
end)
