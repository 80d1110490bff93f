-- bench/calls.lua -- CPU per call of the stream methods a protocol parser
-- calls most (read_until, read_bytes, write), beside their floor: a C
-- function called from Lua that returns (or takes) a string of the same
-- length (bench/callfloor.c).
--
--   build/luahost bench/calls.lua       (bench/run builds bench/build/callfloor.so)
--
-- A client writes LINES 64-byte lines at once over loopback; the server
-- side waits until all of them are in its read buffer (not timed) and then
-- reads them in a loop, which is what is timed (os.clock: this process's
-- CPU). The reads find their data buffered, so no syscall and no yield is
-- in the figure: only the call. write() queues into the write buffer
-- (the loop flushes it after the task yields, outside the timed loop).
-- The floors: floor_plain = floor.str(64), a plain C call returning a new
-- 64-byte string; floor_method = u:str(64), the same as a method on a
-- userdata (the shape of stream:read_bytes(64)); floor_sink = u:sink(s),
-- a method that takes a 64-byte string and copies it into a buffer (the
-- least stream:write(s) can do). read_until_cached calls a method fetched
-- once (`local read_until = stream.read_until`), against floor_plain.
-- Every figure is the minimum, median and maximum over REPEATS repetitions
-- of LINES x BATCHES calls. Output: one line per operation,
--   calls op=NAME ns_min=... ns_med=... ns_max=... floor=NAME
-- Environment: CALLS_LINES (2048), CALLS_BATCHES (100), CALLS_REPEATS (5),
-- CALLS_SIZE (64).
local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.cpath = here .. "/build/?.so;" .. package.cpath

local tcpserver = require "tcpserver"
local tcpclient = require "tcpserver.tcpclient"
local ioloop = require "tcpserver.ioloop"
local locks = require "tcpserver.locks"
local floor = require "callfloor"

local function env_int(name, default)
  return math.tointeger(tonumber(os.getenv(name) or "")) or default
end

local LINES = env_int("CALLS_LINES", 2048)
local BATCHES = env_int("CALLS_BATCHES", 100)
local REPEATS = env_int("CALLS_REPEATS", 5)
local SIZE = env_int("CALLS_SIZE", 64)

local LINE = string.rep("x", SIZE - 1) .. "\n"
local BLOB = string.rep(LINE, LINES)
local clock = os.clock

-- ---- the timed loops: LINES calls each, returning CPU seconds ------------

local function loop_read_until(srv)
  local t0 = clock()
  for _ = 1, LINES do
    local line = srv:read_until("\n")
    if not line then error("read_until failed") end
  end
  return clock() - t0
end

local function loop_read_until_cached(srv)
  local read_until = srv.read_until
  local t0 = clock()
  for _ = 1, LINES do
    local line = read_until(srv, "\n")
    if not line then error("read_until failed") end
  end
  return clock() - t0
end

local function loop_read_bytes(srv)
  local t0 = clock()
  for _ = 1, LINES do
    local data = srv:read_bytes(SIZE)
    if not data then error("read_bytes failed") end
  end
  return clock() - t0
end

local function loop_write(srv)
  local line = LINE
  local t0 = clock()
  for _ = 1, LINES do
    if not srv:write(line) then error("write failed") end
  end
  return clock() - t0
end

local U = floor.new()

local function loop_floor_plain()
  local str = floor.str
  local t0 = clock()
  for _ = 1, LINES do
    local s = str(SIZE)
    if not s then error("floor failed") end
  end
  return clock() - t0
end

local function loop_floor_method()
  local u = U
  local t0 = clock()
  for _ = 1, LINES do
    local s = u:str(SIZE)
    if not s then error("floor failed") end
  end
  return clock() - t0
end

local function loop_floor_sink()
  local u, line = U, LINE
  local t0 = clock()
  for _ = 1, LINES do
    if not u:sink(line) then error("floor failed") end
  end
  return clock() - t0
end

-- ---- one batch of each kind ------------------------------------------------

-- The client sends LINES lines in one write; the server side waits until
-- they are all buffered, then the timed loop reads them.
local function read_batch(srv, cli, loop)
  assert(cli:write(BLOB))
  assert(srv:_fill(#BLOB - 1))
  return loop(srv)
end

local function write_batch(srv, cli)
  local t = loop_write(srv)
  assert(srv:flush())
  assert(cli:read_bytes(#BLOB))
  return t
end

local OPS = {
  -- name, batch function, floor name (the floors come first: the ratios
  -- refer to them)
  {"floor_plain", loop_floor_plain},
  {"floor_method", loop_floor_method},
  {"floor_sink", loop_floor_sink},
  {"read_until", function(s, c) return read_batch(s, c, loop_read_until) end, "floor_method"},
  {"read_until_cached", function(s, c) return read_batch(s, c, loop_read_until_cached) end,
   "floor_plain"},
  {"read_bytes", function(s, c) return read_batch(s, c, loop_read_bytes) end, "floor_method"},
  {"write", write_batch, "floor_method", "floor_sink"},
}

local function stats(v)
  table.sort(v)
  local n = #v
  local m = n % 2 == 1 and v[(n + 1) // 2] or (v[n // 2] + v[n // 2 + 1]) / 2
  return v[1], m, v[n]
end

local function run(srv, cli)
  local per = {}
  -- repetitions interleave the operations, so a slow spell of the machine
  -- hits all of them alike
  for _ = 1, REPEATS do
    for _, op in ipairs(OPS) do
      local name, batch = op[1], op[2]
      collectgarbage("collect")
      local total = 0
      for _ = 1, BATCHES do total = total + batch(srv, cli) end
      per[name] = per[name] or {}
      table.insert(per[name], total * 1e9 / (LINES * BATCHES))
    end
  end
  local med = {}
  for _, op in ipairs(OPS) do
    local lo, m, hi = stats(per[op[1]])
    med[op[1]] = m
    io.write(string.format("calls op=%s size=%d calls=%d ns_min=%.1f ns_med=%.1f ns_max=%.1f",
      op[1], SIZE, LINES * BATCHES, lo, m, hi))
    for i = 3, #op do -- the first floor is the one the target counts against
      io.write(string.format(" %s=%s %s=%.2f", i == 3 and "floor" or "floor2", op[i],
        i == 3 and "ratio_med" or "ratio2_med", m / med[op[i]]))
    end
    io.write("\n")
  end
end

local Server = tcpserver.TCPServer:extend()
local ready, done = locks.Event(), locks.Event()
local server_stream

function Server:handle_stream(stream)
  server_stream = stream
  ready:set()
  done:wait() -- the benchmark task uses the stream; returning would close it
end

local server = Server()
local port = server:listen(0, "127.0.0.1")
local loop = ioloop.current()
local ok, err = pcall(loop.run_sync, loop, function()
  local cli = assert(tcpclient.connect("127.0.0.1", port))
  ready:wait()
  run(server_stream, cli)
  done:set()
  cli:close()
end, 600)
server:stop()
if not ok then
  io.stderr:write("calls.lua: ", tostring(err), "\n")
  os.exit(1)
end
os.exit(0)
