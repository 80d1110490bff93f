--- Prometheus's text format for tcpserver.stats(), and the endpoint that
-- serves it (luahost --stats-port).
local M = {}

-- Prometheus's text format (version 0.0.4) for tcpserver.stats().
local METRICS = {
  {"connections_open", "gauge", "Connections whose handler is running."},
  {"connections_total", "counter", "Connections accepted."},
  {"bytes_in", "counter", "Bytes read from the streams (after TLS)."},
  {"bytes_out", "counter", "Bytes written to the streams (before TLS)."},
  {"handler_errors", "counter", "handle_stream calls that raised an error."},
  {"tls_handshake_failures", "counter", "TLS handshakes that failed."},
}

--- The metrics text for a stats table (from server:stats() or
-- tcpserver.stats()); `task` (a worker's task id) becomes a label.
function M.prometheus_text(stats, task)
  local out = {}
  local labels = task and ('{task="%d"}'):format(task) or ""
  for _, m in ipairs(METRICS) do
    local key, kind, help = m[1], m[2], m[3]
    local name = "tcpserver_" .. key
    if kind == "counter" and not name:match("_total$") then name = name .. "_total" end
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n%s%s %d\n"):format(
      name, help, name, kind, name, labels, math.tointeger(stats[key]) or 0)
  end
  return table.concat(out)
end

--- serve(port): a minimal HTTP/1.1 responder for GET /metrics on
-- 127.0.0.1:port (luahost --stats-port). Under fork_processes, worker k
-- serves its own counters on port + k.
function M.serve(port)
  local tcpserver = require "tcpserver"
  local process = require "tcpserver.process"
  local Stats = tcpserver.TCPServer:extend()
  function Stats:handle_stream(stream)
    stream:settimeout(10)
    local head = stream:read_until("\r\n\r\n", 8192)
    if not head then return end
    local method, path = head:match("^(%u+) (%S+) HTTP/1%.[01]\r\n")
    local status, body, ctype = "404 Not Found", "not found: try /metrics\n", "text/plain"
    if not method then
      status, body = "400 Bad Request", "bad request\n"
    elseif path == "/metrics" or path == "/" then
      status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
      -- the task id of the process that answers: a script that forks
      -- after this shares the port among its workers
      body = method == "HEAD" and "" or M.prometheus_text(tcpserver.stats(), process.task_id())
    end
    stream:write(("HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                  .. "Connection: close\r\n\r\n%s"):format(status, ctype, #body, body))
  end
  local server = Stats({in_stats = false})
  -- A worker's port is its task id's: during a reload (SIGHUP) the new
  -- worker binds it while the old one still serves it, as with every
  -- listener of a worker. A lone process keeps it to itself.
  local task = process.task_id()
  local ok, err = pcall(server.listen, server, port + (task or 0), "127.0.0.1",
                        {reuse_port = task ~= nil})
  if not ok then error("--stats-port: " .. tostring(err), 0) end
end

return M
