--- IOStream: the stream methods live in C (tcpserver.core); this module
-- adds the few that are policy, and exposes the method table.
local core = require "tcpserver.core"

local M = {}

local methods = core.stream_mt.__index

--- start_tls(server_side, ssl_options [, server_hostname]): upgrades the
-- stream in place (STARTTLS) and waits for the handshake: true or nil, err.
-- Raises if a read or write is pending or unread plain data is buffered.
function methods.start_tls(stream, server_side, ssl_options, server_hostname, timeout)
  local ssl = require "tcpserver.ssl"
  local ctx = server_side and ssl.server_context(ssl_options) or ssl.wrap(ssl_options)
  local ok, err = stream:flush()
  if not ok then return nil, err end
  ok, err = stream:_start_tls(server_side, ctx, server_hostname, timeout)
  if not ok then return nil, err end
  return stream:wait_for_handshake()
end

--- read_until_pattern(pattern [, max_bytes]): reads up to and including
-- the first match of the Lua pattern `pattern` (as Tornado's
-- read_until_regex). Returns the data, or nil, err, partial: "too large"
-- (closing the stream) when no match ends within max_bytes (or the
-- buffer's limit). The pattern is tried again over everything buffered
-- as more arrives, so keep max_bytes small for patterns on slow peers.
function methods.read_until_pattern(stream, pattern, max_bytes)
  if type(pattern) ~= "string" or pattern == "" then
    error("bad argument #1 to 'read_until_pattern' (non-empty string expected)", 2)
  end
  if max_bytes ~= nil and (math.type(max_bytes) ~= "integer" or max_bytes < 1) then
    error("bad argument #2 to 'read_until_pattern' (positive integer expected)", 2)
  end
  while true do
    local buf = stream:_buffered()
    local _, stop = buf:find(pattern)
    if stop and max_bytes and stop > max_bytes or not stop and max_bytes and #buf >= max_bytes then
      stream:close()
      return nil, "too large"
    end
    if stop then return stream:read_bytes(stop) end
    local ok, err, partial = stream:_fill(#buf)
    if not ok then return nil, err, partial end
  end
end

--- peek(n): the next n bytes, left unread: waits until n are buffered.
-- Returns them, or nil, err, partial (what was buffered) if the stream
-- ends first (then it closes) or n passes max_buffer_size.
function methods.peek(stream, n)
  if math.type(n) ~= "integer" or n < 1 then
    error("bad argument #1 to 'peek' (positive integer expected)", 2)
  end
  local buf = stream:_buffered()
  if #buf >= n then return buf:sub(1, n) end
  local ok, err, partial = stream:_fill(n - 1)
  if not ok then return nil, err, partial end
  return stream:_buffered():sub(1, n)
end

--- skip_until(delim [, max_bytes]): reads and drops bytes up to and
-- including `delim` (the rest of an oversized line after read_until's
-- "keep"), never buffering more than the stream reads at a time.
-- Returns the number of bytes dropped, or nil, err ("too large" past
-- max_bytes, which closes the stream, or the stream's end).
function methods.skip_until(stream, delim, max_bytes)
  if type(delim) ~= "string" or delim == "" then
    error("bad argument #1 to 'skip_until' (non-empty string expected)", 2)
  end
  local dropped, keep = 0, #delim - 1
  while true do
    local buf = stream:_buffered()
    local _, stop = buf:find(delim, 1, true)
    local n = stop or math.max(#buf - keep, 0) -- a delimiter may straddle reads
    if max_bytes and dropped + n > max_bytes then
      stream:close()
      return nil, "too large"
    end
    if n > 0 then
      stream:read_bytes(n)
      dropped = dropped + n
    end
    if stop then return dropped end
    local ok, err = stream:_fill(#buf - n)
    if not ok then return nil, err end
  end
end

--- set_keepalive([idle_timeout [, pool_size]]): puts a stream that
-- tcpclient.connect made back into its pool instead of closing it
-- (OpenResty's setkeepalive, in seconds: 60 by default, 0 for no limit);
-- the stream is not to be used after. true, or nil, err (it is closed:
-- unread bytes, or closed already).
function methods.set_keepalive(stream, idle_timeout, pool_size)
  return require("tcpserver.pool").keepalive(stream, nil, idle_timeout, pool_size)
end

--- How many times the pool handed this stream out again.
function methods.getreusedtimes(stream)
  return require("tcpserver.pool").reused_times(stream)
end

M.IOStream = methods
M.core = core
return M
