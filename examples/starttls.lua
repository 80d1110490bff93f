-- STARTTLS: an SMTP-style server that starts in plain text and, when the
-- client says STARTTLS, upgrades the same connection to TLS in place.
-- Mail is accepted (and thrown away) only over TLS.
--   luahost examples/starttls.lua [--port 8025] [--host 127.0.0.1]
--                                 [--certfile cert.pem --keyfile key.pem]
--   openssl s_client -starttls smtp -connect 127.0.0.1:8025 -crlf -quiet
-- Without --certfile/--keyfile it uses the self-signed pair that
-- examples/tls_echo.lua makes on its first run.
--
--   S: 220 localhost ESMTP             C: EHLO me
--   S: 250-localhost greets me         S: 250 STARTTLS
--   C: STARTTLS                        S: 220 Ready to start TLS
--   ... TLS handshake; from here on everything is encrypted ...
--   C: EHLO me, MAIL FROM:<a@b>, RCPT TO:<c@d>, DATA, the message, ".", QUIT
local tcpserver = require "tcpserver"
local ioloop = require "tcpserver.ioloop"
local log = require "tcpserver.log"

local opts = require("tcpserver.flags").parse(arg,
  {port = 8025, host = "127.0.0.1", certfile = false, keyfile = false})

local tmp = os.getenv("TMPDIR") or "/tmp"
local tls = {
  certfile = opts.certfile or tmp .. "/tcpserver-tls_echo.pem",
  keyfile = opts.keyfile or tmp .. "/tcpserver-tls_echo.key",
}
-- One context for every connection: the files are loaded once, here,
-- and a missing one stops the script before it listens.
local loaded, context = pcall(require("tcpserver.ssl").context, tls)
if not loaded then
  error(context .. " (run examples/tls_echo.lua once to make a self-signed pair," ..
        " or give --certfile and --keyfile)", 0)
end

local MAX_LINE = 1000              -- SMTP's limit, CRLF included
local MAX_MESSAGE = 1024 * 1024

-- A reply: one line, or several ("250-a", "250-b", "250 c").
local function reply(stream, code, ...)
  local lines, n = {}, select("#", ...)
  for i = 1, n do
    lines[i] = ("%d%s%s\r\n"):format(code, i < n and "-" or " ", (select(i, ...)))
  end
  return stream:write(lines)
end

-- A line without its CRLF; nil when the client is gone.
local function read_line(stream)
  local line = stream:read_until("\n", MAX_LINE)
  return line and line:gsub("\r?\n$", "")
end

-- DATA's message: lines up to a lone ".", with the leading dot of ".."
-- lines removed. Returns its size, or nil (client gone) or false (too big).
local function read_message(stream)
  local size = 0
  while true do
    local line = read_line(stream)
    if not line then return nil end
    if line == "." then break end
    size = size + #line - (line:sub(1, 2) == ".." and 1 or 0) + 2
  end
  return size <= MAX_MESSAGE and size
end

local SMTP = tcpserver.TCPServer:extend()

function SMTP:handle_stream(stream, address)
  local secure, greeted, from, rcpts, queued = false, false, nil, {}, 0
  reply(stream, 220, "localhost ESMTP tcpserver example")
  while true do
    local line = read_line(stream)
    if not line then return end
    local verb, rest = line:match("^(%a+)%s*(.*)") -- then a greedy trim: a lazy
    rest = rest and (rest:match("^(.*%S)") or "") -- (.-)%s*$ is quadratic in spaces
    verb = verb and verb:upper()
    if verb == "EHLO" or verb == "HELO" then
      greeted, from, rcpts = true, nil, {}
      if secure then
        reply(stream, 250, "localhost greets " .. rest, "8BITMIME")
      else
        reply(stream, 250, "localhost greets " .. rest, "STARTTLS")
      end
    elseif verb == "STARTTLS" and not secure then
      -- Anything sent after STARTTLS but before the handshake would be
      -- plain text that looks encrypted later (CVE-2011-0411): refuse it.
      if stream:buffer_sizes() > 0 then
        reply(stream, 503, "5.5.1 nothing may follow STARTTLS before the handshake")
        return
      end
      reply(stream, 220, "Ready to start TLS")
      local ok, err = stream:start_tls(true, context) -- flushes, then handshakes
      if not ok then
        log.info("%s: STARTTLS failed: %s", address, err)
        return
      end
      -- RFC 3207: forget everything said in plain text; EHLO again.
      secure, greeted, from, rcpts = true, false, nil, {}
    elseif verb == "MAIL" or verb == "RCPT" or verb == "DATA" then
      if not secure then
        reply(stream, 530, "5.7.0 Must issue a STARTTLS command first")
      elseif not greeted then
        reply(stream, 503, "5.5.1 EHLO first")
      elseif verb == "MAIL" then
        from, rcpts = rest:match("^[Ff][Rr][Oo][Mm]:%s*(<.*>)"), {}
        reply(stream, from and 250 or 501, from and "OK" or "5.5.4 MAIL FROM:<address>")
      elseif verb == "RCPT" then
        local to = from and rest:match("^[Tt][Oo]:%s*(<.*>)")
        if to then rcpts[#rcpts + 1] = to end
        reply(stream, to and 250 or 503, to and "OK" or "5.5.1 MAIL FROM first, then RCPT TO:<address>")
      elseif #rcpts == 0 then
        reply(stream, 503, "5.5.1 RCPT TO first")
      else
        reply(stream, 354, "End data with <CR><LF>.<CR><LF>")
        local size = read_message(stream)
        if size == nil then return end
        if size then
          queued = queued + 1
          log.info("message from %s to %s: %d bytes (%s)", from, table.concat(rcpts, ", "),
                   size, stream:tls_version())
          reply(stream, 250, ("OK: queued as %d"):format(queued))
        else
          reply(stream, 552, "5.3.4 message too big")
        end
        from, rcpts = nil, {}
      end
    elseif verb == "NOOP" then
      reply(stream, 250, "OK")
    elseif verb == "RSET" then
      from, rcpts = nil, {}
      reply(stream, 250, "OK")
    elseif verb == "QUIT" then
      reply(stream, 221, "Bye")
      return -- the server flushes and closes the stream
    else
      reply(stream, 502, "5.5.2 command not recognized")
    end
  end
end

local server = SMTP()
local port = server:listen(opts.port, opts.host)
log.info("SMTP server listening on %s:%d", opts.host, port)
ioloop.current():start()
