-- An HTTP/1.1 server: keep-alive connections, request parsing, bodies
-- sent with Content-Length or chunked, `Connection: close`, 400 for
-- requests it cannot parse (a head over 64 KiB just closes the
-- connection) and 408 for a body that stops arriving for --idle seconds
-- (60).
--   luahost examples/http.lua [--port 8080] [--host 127.0.0.1] [--idle SECONDS]
--   curl -i http://127.0.0.1:8080/
--   curl --data-binary 'some text' http://127.0.0.1:8080/echo
--
-- One coroutine per connection reads requests one after the other; what
-- a client pipelines simply waits in the stream's buffer. The routes are
-- at the bottom: a function gets the request and returns status, body and
-- optionally a table of headers.
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg, {port = 8080, host = "127.0.0.1", idle = 60.0})

local MAX_HEAD = 64 * 1024     -- request line and headers
local MAX_BODY = 1024 * 1024   -- larger bodies get 413
local IDLE = opts.idle         -- seconds a client may send nothing (--idle)

local REASONS = {
  [100] = "Continue", [200] = "OK", [400] = "Bad Request", [404] = "Not Found",
  [405] = "Method Not Allowed", [408] = "Request Timeout", [413] = "Content Too Large",
  [501] = "Not Implemented",
}

-- ---- parsing ------------------------------------------------------------------

-- A header line's name, then its value: no folded lines, no space before
-- ":", no control character but tab in a value (RFC 9110 5.5). Anchored
-- matches and a greedy trim: a pattern that could backtrack across the
-- value would take seconds on a 64 KiB one. (%w comes first in the set: a
-- set is tried item by item.)
local TOKEN = "[%w!#$%%&'*+.^_`|~-]+"  -- a field name (RFC 9110 5.6.2)
local FIELD_CHARS = "[\t -~\128-\255]" -- a value's: no control character but tab
local FIELD_NAME = "^(" .. TOKEN .. "):[ \t]*()"
local FIELD_VALUE = "^(" .. FIELD_CHARS .. "*)\r\n()"

-- A request's head (everything up to the empty line) as
-- {method=, target=, path=, query=, version="1.1", headers={lower-case name = value}},
-- or nil if it is malformed.
local function parse_head(head)
  -- (empty lines before the request line are ignored: RFC 9112 2.2)
  local method, target, minor, at = head:match("^[\r\n]*(%u+) (%S+) HTTP/1%.([01])\r\n()")
  if not method then return nil end
  local headers, repeated = {}, nil
  while at < #head - 1 do -- the head ends with the empty line's "\r\n"
    local name, from = head:match(FIELD_NAME, at)
    if not name then return nil end
    local value, nxt = head:match(FIELD_VALUE, from)
    if not value then return nil end
    local last = value:byte(-1)
    if last == 32 or last == 9 then value = value:match("^(.*[^ \t])") or "" end
    name = name:lower()
    local first = headers[name]
    if first == nil then
      headers[name] = value
    elseif name == "content-length" or name == "host" then
      return nil -- two of these: refused (request smuggling; RFC 9112 3.2)
    else -- repeated headers combine, joined once at the end
      repeated = repeated or {}
      local values = repeated[name] or {first}
      values[#values + 1], repeated[name] = value, values
    end
    at = nxt
  end
  if repeated then
    for name, values in pairs(repeated) do headers[name] = table.concat(values, ", ") end
  end
  -- origin-form, or absolute-form (which a server must accept: RFC 9112 3.2.2)
  local path, query = target:match("^(/[^?#]*)%??([^#]*)")
  if not path then
    path, query = target:match("^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*(/?[^?#]*)%??([^#]*)")
    if not path then return nil end
    if path == "" then path = "/" end
  end
  return {method = method, target = target, path = path, query = query,
          version = minor == "1" and "1.1" or "1.0", headers = headers}
end

-- Why a read failed, as a status to answer with: 408 when the client
-- stopped sending for IDLE seconds, nil when it went away (or the core
-- closed the stream: nothing can be answered then).
local function read_failed(err)
  return nil, err == "timeout" and 408 or nil
end

-- n bytes, taken as they arrive: IDLE bounds each wait, so a slow upload
-- is not cut off as long as it keeps coming.
local function read_exactly(stream, n)
  if n == 0 then return "" end
  local data, err = stream:read_bytes(n, true)
  if not data then return read_failed(err) end
  if #data == n then return data end
  local parts, got = {data}, #data
  repeat
    data, err = stream:read_bytes(n - got, true)
    if not data then return read_failed(err) end
    parts[#parts + 1], got = data, got + #data
  until got == n
  return table.concat(parts)
end

-- A chunk-size line ("1a\r\n", "1a;name=value\r\n") and a trailer line,
-- with a value's characters: no bare CR or LF.
local CHUNK_SIZE = "^(%x+)(" .. FIELD_CHARS .. "*)\r\n$"
local TRAILER = "^" .. TOKEN .. ":" .. FIELD_CHARS .. "*\r\n$"

-- A chunked body: hex size lines, each chunk followed by CRLF, a zero
-- size, optional trailers and an empty line. Returns the body, or nil and
-- an HTTP status (nil if the client went away).
local function read_chunked(stream)
  local parts, size = {}, 0
  while true do
    local line, err = stream:read_until("\r\n", 1024)
    if not line then return read_failed(err) end
    local hex, ext = line:match(CHUNK_SIZE) -- a ";name=value" extension is ignored
    if not hex or #hex > 8 or (ext ~= "" and not ext:match("^[ \t]*;")) then return nil, 400 end
    local n = tonumber(hex, 16)
    size = size + n
    if size > MAX_BODY then return nil, 413 end
    if n == 0 then break end
    local chunk, status = read_exactly(stream, n + 2)
    if not chunk then return nil, status end
    if chunk:sub(-2) ~= "\r\n" then return nil, 400 end
    parts[#parts + 1] = chunk:sub(1, -3)
  end
  while true do -- trailers, up to the empty line
    local line, err = stream:read_until("\r\n", MAX_HEAD)
    if not line then return read_failed(err) end
    if line == "\r\n" then return table.concat(parts) end
    if not line:match(TRAILER) then return nil, 400 end
  end
end

-- The request's body: "" if it has none; nil and a status as above.
local function read_body(stream, req)
  local te, length = req.headers["transfer-encoding"], req.headers["content-length"]
  if te and (length or req.version == "1.0") then return nil, 400 end -- ambiguous framing (RFC 9112 6.1)
  if not te and not length then return "" end
  if te and te:lower() ~= "chunked" then return nil, 501 end
  if length and (not length:match("^%d+$") or #length > 12) then return nil, 400 end
  if length and tonumber(length) > MAX_BODY then return nil, 413 end
  local expect = req.headers.expect
  if expect and req.version == "1.1" and expect:lower() == "100-continue" then
    stream:write("HTTP/1.1 100 Continue\r\n\r\n") -- the client waits for this to send
  end
  if te then return read_chunked(stream) end
  return read_exactly(stream, tonumber(length))
end

-- Whether the client asked to close after this request: HTTP/1.1 keeps
-- the connection unless told `close`, HTTP/1.0 closes unless told `keep-alive`.
local function wants_close(req)
  local connection = req.headers.connection
  if not connection then return req.version == "1.0" end
  connection = connection:lower()
  if req.version == "1.0" then return not connection:find("keep-alive", 1, true) end
  return connection:find("close", 1, true) ~= nil
end

-- ---- responding ---------------------------------------------------------------

-- "HTTP/1.1 200 OK\r\n" and the others, made once rather than per response.
local STATUS_LINES = setmetatable({}, {__index = function(lines, status)
  lines[status] = ("HTTP/1.1 %d %s\r\n"):format(status, REASONS[status] or "Unknown")
  return lines[status]
end})

-- Writes a whole response; HEAD gets no body. The writes are buffered
-- and leave in one system call when the handler next waits.
local function respond(stream, req, status, body, headers, close)
  local extra = close and "Connection: close\r\n" or
                req and req.version == "1.0" and "Connection: keep-alive\r\n" or ""
  if headers then
    for name, value in pairs(headers) do
      if name ~= "Content-Type" then extra = extra .. name .. ": " .. value .. "\r\n" end
    end
  end
  local ok, err = stream:write(STATUS_LINES[status] ..
    "Content-Type: " .. (headers and headers["Content-Type"] or "text/plain; charset=utf-8") ..
    "\r\nContent-Length: " .. #body .. "\r\n" .. extra .. "\r\n") -- one string, one concatenation
  if not ok or (req and req.method == "HEAD") then return ok, err end
  return stream:write(body)
end

-- ---- the application ----------------------------------------------------------

local routes = {}

routes["/"] = function(req)
  if req.method ~= "GET" and req.method ~= "HEAD" then return 405, "GET only\n", {Allow = "GET, HEAD"} end
  return 200, "Hello, world!\n"
end

routes["/echo"] = function(req)
  if req.method ~= "POST" then return 405, "POST only\n", {Allow = "POST"} end
  return 200, req.body, {["Content-Type"] = req.headers["content-type"]}
end

-- ---- the server ---------------------------------------------------------------

local HttpServer = tcpserver.TCPServer:extend()

function HttpServer:handle_stream(stream)
  while true do
    -- the head: nil when the client closed, stayed idle for IDLE seconds,
    -- or sent more than MAX_HEAD without an empty line (then the core closes)
    local head = stream:read_until("\r\n\r\n", MAX_HEAD)
    if not head then return end
    local req = parse_head(head)
    if not req or (req.version == "1.1" and not req.headers.host) then
      return respond(stream, nil, 400, "Bad Request\n", nil, true)
    end
    local body, status = read_body(stream, req)
    if not body then
      if status then respond(stream, req, status, REASONS[status] .. "\n", nil, true) end
      return -- after an error the rest of the stream cannot be trusted
    end
    req.body = body
    local route = routes[req.path]
    local headers
    if route then
      status, body, headers = route(req)
    else
      status, body = 404, "Not Found\n"
    end
    local close = wants_close(req)
    if not respond(stream, req, status, body, headers, close) or close then return end
  end
end

local server = HttpServer({idle_timeout = IDLE})
local port = server:listen(opts.port, opts.host)
log.info("http server listening on http://%s:%d/", opts.host, port)
ioloop.current():start()
