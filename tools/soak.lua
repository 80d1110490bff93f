-- Soak: connect/echo/close cycles (plain, TLS, PROXY v1/v2, PROXY+TLS)
-- and waves of idle connections against one server process, watching its
-- memory and descriptors.
--
--   build/luahost tools/soak.lua [cycles [idle]]      (make soak)
--
-- Prints the server's RSS at start, after a warm-up (a fifth of the
-- cycles, one idle wave, one latency run) and at the end, its descriptors against the
-- baseline, and the echo latency (p50/p99) while 5,000 connections idle.
-- Exits non-zero if RSS grew more than 10% after the warm-up, if the
-- descriptors do not return to their baseline, or if any cycle failed.
package.path = arg[0]:gsub("[^/]*$", "?.lua;") .. package.path
local M = require "multiproc"
local ioloop = require "tcpserver.ioloop"
local process = require "tcpserver.process"
local ssl = require "tcpserver.ssl"
local tcpclient = require "tcpserver.tcpclient"
local tcpserver = require "tcpserver"

local CYCLES = tonumber(arg[1]) or 100000
local IDLE = tonumber(arg[2]) or 10000
local WAVES = 3             -- idle waves: one in the warm-up, the rest after
local CLIENTS = 32          -- tasks running cycles at once
local OPENERS = 100         -- tasks opening an idle wave
local LATENCY_IDLE = 5000
local LATENCY_SAMPLES = 2000
local MAX_GROWTH = 0.10

local Echo = tcpserver.TCPServer:extend({handle_stream = function(_, stream)
  while true do
    local line = stream:read_until("\n")
    if not line then return end
    stream:write(line)
  end
end})

-- The server side: four listeners, their ports printed on one line.
local function serve(certdir)
  process.raise_fd_limit()
  local tls = ssl.context({certfile = certdir .. "/cert.pem", keyfile = certdir .. "/key.pem"})
  local ports = {
    Echo():listen(0, "127.0.0.1"),
    Echo({ssl_options = tls}):listen(0, "127.0.0.1"),
    Echo({proxy_protocol = true}):listen(0, "127.0.0.1"),
    Echo({proxy_protocol = true, ssl_options = tls}):listen(0, "127.0.0.1"),
  }
  print(table.concat(ports, " "))
  io.stdout:flush()
end

local function make_certificate()
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute(("mkdir -p %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 " ..
    "-nodes -keyout %s/key.pem -out %s/cert.pem -days 2 -subj /CN=localhost " ..
    "-addext subjectAltName=DNS:localhost 2>/dev/null"):format(dir, dir, dir)))
  return dir
end

-- ---- the server's figures, from /proc ----

local function rss_kb(pid)
  local f = assert(io.open(("/proc/%d/status"):format(pid)))
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb
end

local function fds(pid)
  local p = assert(io.popen(("ls /proc/%d/fd | wc -l"):format(pid)))
  local n = tonumber(p:read("a"))
  p:close()
  return n
end

local function mb(kb) return ("%.1f MB"):format(kb / 1024) end

-- ---- clients ----

local PROXY_V1 = "PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n"
local PROXY_V2 = "\r\n\r\n\0\r\nQUIT\n\x21\x11\0\12" .. "\198\51\100\7" .. "\203\0\113\1" .. "\156\64\1\187"

-- One kind of connection per slot of ten: six plain, then PROXY v1,
-- PROXY v2, TLS, PROXY v1 + TLS.
local KINDS = {"plain", "plain", "plain", "plain", "plain", "plain", "proxy1", "proxy2", "tls", "proxy_tls"}

local function open(ports, kind, client_tls)
  local port = kind == "tls" and ports[2] or kind:match("^proxy") and
    (kind == "proxy_tls" and ports[4] or ports[3]) or ports[1]
  local opts = kind == "tls" and {ssl_options = client_tls, server_hostname = "localhost"} or nil
  local c, err = tcpclient.connect("127.0.0.1", port, opts)
  if not c then return nil, err end
  if kind == "proxy1" or kind == "proxy_tls" then c:write(PROXY_V1) end
  if kind == "proxy2" then c:write(PROXY_V2) end
  if kind == "proxy_tls" then
    local ok, e = c:start_tls(false, client_tls, "localhost")
    if not ok then c:close() return nil, e end
  end
  return c
end

local function cycle(ports, i, client_tls, errors)
  local kind = KINDS[i % #KINDS + 1]
  local c, err = open(ports, kind, client_tls)
  local line = "ping " .. i .. "\n"
  local reply
  if c then
    c:write(line)
    reply, err = c:read_until("\n")
    c:close()
  end
  if reply ~= line then
    local key = kind .. ": " .. tostring(err)
    errors[key] = (errors[key] or 0) + 1
  end
end

local function run_cycles(ports, first, last, client_tls, errors)
  local next_i = first
  M.spawn_clients(CLIENTS, function()
    while next_i <= last do
      local i = next_i
      next_i = next_i + 1
      cycle(ports, i, client_tls, errors)
    end
  end)()
end

-- Opens n idle connections (one in twenty PROXY, one in twenty TLS);
-- returns them.
local function open_idle(ports, n, client_tls, errors)
  local conns, next_i = {}, 1
  M.spawn_clients(OPENERS, function()
    while next_i <= n do
      local i = next_i
      next_i = next_i + 1
      local kind = i % 20 == 0 and "tls" or i % 20 == 10 and "proxy1" or "plain"
      local c, err = open(ports, kind, client_tls)
      if c then
        conns[#conns + 1] = c
      else
        local key = "idle " .. kind .. ": " .. tostring(err)
        errors[key] = (errors[key] or 0) + 1
      end
    end
  end)()
  return conns
end

local function close_all(conns)
  for _, c in ipairs(conns) do c:close() end
end

-- Waits (polling /proc each 50 ms, at most 10 s) for the server's
-- descriptors to come back to `base`; returns the last count.
local function settle_fds(pid, base)
  local n, last
  for _ = 1, 200 do
    n = fds(pid)
    if n <= base or n == last then return n end -- at the baseline, or stable
    last = n
    ioloop.sleep(0.05)
  end
  return n
end

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local function echo_latency(ports)
  local c = assert(open(ports, "plain"))
  local loop, samples = ioloop.current(), {}
  for i = 1, LATENCY_SAMPLES do
    local t0 = loop:time()
    c:write("latency " .. i .. "\n")
    assert(c:read_until("\n"))
    samples[i] = (loop:time() - t0) * 1e6
  end
  c:close()
  table.sort(samples)
  return percentile(samples, 0.5), percentile(samples, 0.99)
end

local function main()
  process.raise_fd_limit()
  local loop = ioloop.current()
  local started = loop:time()
  local certdir = make_certificate()
  local client_tls = ssl.context({cafile = certdir .. "/cert.pem"})
  local server = process.Subprocess({arg[-1], arg[0], "--serve", certdir, "0"}, {stdout = "pipe"})
  local ports = {}
  for p in server.stdout:read_until("\n"):gmatch("%d+") do ports[#ports + 1] = tonumber(p) end
  local pid, errors = server.pid, {}
  local rss0 = rss_kb(pid)
  -- The baseline after one cycle of each kind: the first TLS handshake
  -- opens what OpenSSL keeps open for good.
  run_cycles(ports, 1, #KINDS, client_tls, errors)
  local base_fds = settle_fds(pid, 0)
  print(("soak: %d cycles (60%% plain, 10%% each PROXY v1, PROXY v2, TLS, PROXY+TLS), %d idle waves of %d")
        :format(CYCLES, WAVES, IDLE))
  print(("server pid %d: RSS %s at start, %d descriptors after one cycle of each kind")
        :format(pid, mb(rss0), base_fds))

  -- The warm-up sees every workload once: cycles, an idle wave, and the
  -- latency phase; growth is measured from its end.
  local warm = CYCLES // 5
  local function wave(label)
    local conns = open_idle(ports, IDLE, client_tls, errors)
    print(("  %s: %d idle connections open: server RSS %s, %d descriptors")
          :format(label, #conns, mb(rss_kb(pid)), fds(pid)))
    close_all(conns)
    settle_fds(pid, base_fds)
  end
  local function latency(label)
    local idle = open_idle(ports, LATENCY_IDLE, client_tls, errors)
    local p50, p99 = echo_latency(ports)
    print(("  %s: echo latency with %d idle connections: p50 %.0f us, p99 %.0f us")
          :format(label, #idle, p50, p99))
    close_all(idle)
    settle_fds(pid, base_fds)
  end

  run_cycles(ports, #KINDS + 1, warm, client_tls, errors)
  wave("wave 1 (warm-up)")
  latency("warm-up")
  local rss_warm, fds_warm = rss_kb(pid), settle_fds(pid, base_fds)
  print(("after warm-up (%d cycles, 1 wave, 1 latency run): RSS %s, %d descriptors")
        :format(warm, mb(rss_warm), fds_warm))

  local per_round = (CYCLES - warm) // (WAVES - 1)
  local done = warm
  for w = 2, WAVES do
    local last = w == WAVES and CYCLES or done + per_round
    run_cycles(ports, done + 1, last, client_tls, errors)
    done = last
    print(("  %d cycles done (%.0f s): RSS %s"):format(done, loop:time() - started, mb(rss_kb(pid))))
    wave(("wave %d"):format(w))
  end
  latency("final")

  local fds_end = settle_fds(pid, base_fds)
  local rss_end = rss_kb(pid)
  local growth = (rss_end - rss_warm) / rss_warm
  print(("at the end: RSS %s (%+.1f%% since the warm-up), %d descriptors (baseline %d); %.0f s")
        :format(mb(rss_end), growth * 100, fds_end, base_fds, loop:time() - started))
  M.stop_server(server)
  os.execute("rm -rf " .. certdir)

  local failed = false
  for what, n in pairs(errors) do
    print(("FAIL: %d x %s"):format(n, what))
    failed = true
  end
  if growth > MAX_GROWTH then
    print(("FAIL: RSS grew %.1f%% after the warm-up (limit %d%%)"):format(growth * 100, MAX_GROWTH * 100))
    failed = true
  end
  if fds_end ~= base_fds then
    print(("FAIL: %d descriptors at the end, %d at start"):format(fds_end, base_fds))
    failed = true
  end
  print(failed and "soak: FAILED" or "soak: ok")
  os.exit(failed and 1 or 0)
end

M.run(serve, main)
