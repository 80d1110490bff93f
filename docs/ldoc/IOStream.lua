--- The stream every connection gets: `handle_stream(stream, address)` on a
-- server, `tcpclient.connect` on a client, `Subprocess` pipes.
--
-- These methods live in the C core (tcpserver.core); this file only
-- documents them for LDoc and is never loaded.
--
-- Every method that may wait yields the calling task (a handler, a
-- `spawn_callback`, `run_sync` or `testing.async` body) and never blocks
-- the loop. Errors are values: `nil, err` with `err` one of `"closed"`,
-- `"timeout"`, `"too large"` (max_bytes or max_buffer_size exceeded: the
-- stream is closed), `"connection refused"`, `"tls: <reason>"`.
-- Programming mistakes raise: a second concurrent read (`already
-- reading`), a waiting call outside a task, a wrong argument type.
--
-- In a hot loop, `local read_until = stream.read_until` then
-- `read_until(stream, "\n")` saves the method lookup a userdata costs.
-- @classmod IOStream
local IOStream = {}

--- Reading.
-- @section reading

--- Reads up to and including `delim`.
-- Returns at once when the buffer already holds it; data the peer sent
-- before closing stays readable.
-- @string delim the delimiter (any bytes, one or more)
-- @int[opt] max_bytes fail with `"too large"` (and close) past this many
-- bytes without the delimiter (default: the server's max_buffer_size)
-- @string[opt] keep `"keep"`: past `max_bytes` the stream stays open and the
-- first `max_bytes` bytes come back as the partial (consumed), so that a
-- protocol can send its own refusal and `skip_until` the rest
-- @treturn[1] string the data, delimiter included
-- @treturn[2] nil
-- @treturn[2] string err
-- @treturn[2] string partial what was read before the error
function IOStream:read_until(delim, max_bytes, keep) end

--- Drops bytes up to and including `delim` without buffering them all
-- (the rest of an oversized line after `read_until`'s `"keep"`).
-- @string delim
-- @int[opt] max_bytes past this many, `"too large"` (and close)
-- @treturn[1] int the bytes dropped
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:skip_until(delim, max_bytes) end

--- The next `n` bytes, left unread: waits until `n` are buffered.
-- @int n
-- @treturn[1] string
-- @treturn[2] nil
-- @treturn[2] string err
-- @treturn[2] string partial what was buffered (the stream ended: it closes)
function IOStream:peek(n) end

--- Reads exactly `n` bytes, or with `partial` 1 to `n` bytes as soon as
-- any are there.
-- @int n
-- @bool[opt] partial
-- @treturn[1] string
-- @treturn[2] nil
-- @treturn[2] string err
-- @treturn[2] string partial
function IOStream:read_bytes(n, partial) end

--- Reads everything up to EOF.
-- @treturn[1] string everything the peer sent (`""` if nothing)
-- @treturn[2] nil
-- @treturn[2] string err
-- @treturn[2] string partial
function IOStream:read_until_close() end

--- Reads up to and including the first match of the Lua pattern `pattern`
-- (Tornado's read_until_regex). The pattern is tried over everything
-- buffered each time more arrives: keep `max_bytes` small for slow peers.
-- @tparam string pattern a Lua pattern
-- @tparam[opt] integer max_bytes fail with "too large" (and close) if no
-- match ends within this many bytes
-- @treturn[1] string the data, the match included
-- @treturn[2] nil
-- @treturn[2] string err "closed", "timeout", "too large"
-- @treturn[2] string partial
function IOStream:read_until_pattern(pattern, max_bytes) end

--- Writing.
-- @section writing

--- Queues `data`; the stream's write buffer is flushed once when the task
-- yields or returns (one system call per wake-up). Returns at once unless
-- the buffer is over its high-water mark (1 MiB), where it waits until
-- drained. Also callable from plain callbacks, where it never waits.
-- Several tasks writing to one stream (a chat broadcast) queue in order:
-- each waits until its own bytes are handed to the kernel.
-- @tparam string|{string,...} data a string, or a list written as one writev
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:write(data) end

--- Waits until everything written has been handed to the kernel.
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:flush() end

--- Timeouts, closing and options.
-- @section control

--- Sets a limit on each later wait (a read, a write over the high-water
-- mark, `flush`, `wait_for_handshake`). Expiry returns `nil, "timeout"` and
-- leaves the stream open. The server's `idle_timeout` option is the default.
-- @number[opt] seconds nil or 0: no limit
function IOStream:set_timeout(seconds) end

--- The same as @{set_timeout} (LuaSocket's and OpenResty's name).
-- @tparam ?number seconds
function IOStream:settimeout(seconds) end

--- Closes the stream (a TLS stream sends close_notify first). Waiting
-- tasks get `nil, "closed"`. Also runs for `local s <close> = ...`.
function IOStream:close() end

--- Whether the stream is closed.
-- @treturn boolean
function IOStream:closed() end

--- `fn()` runs once when the stream closes, from either side.
-- @func fn
function IOStream:set_close_callback(fn) end

--- Sets the limits of a read's and a write's wait apart (OpenResty's
-- settimeouts, in seconds; nil or 0: none). `connect` is taken for
-- tcpserver.socket's sake: a stream is connected already.
-- @number[opt] connect
-- @number[opt] send
-- @number[opt] read
function IOStream:settimeouts(connect, send, read) end

--- Lets the stream stay open at the peer's end: a read there gets
-- nil, "closed" (read_until_close: the data), and the stream may still be
-- written until close(). For a proxy that passes a half-close on with
-- shutdown("send"), or a server that answers after the client's end.
-- @bool[opt=true] on
function IOStream:set_half_open(on) end

--- Sets TCP_NODELAY (on by default for accepted TCP streams; writes are
-- coalesced per wake-up already). Does nothing on unix sockets and pipes.
-- @bool[opt=true] on
function IOStream:set_nodelay(on) end

--- Ends sending. `"send"`: a half-close once what was written has gone;
-- the peer reads the end and this side reads on; later writes get
-- `nil, "closed"` (not over TLS yet: `nil, err`). `"both"` (the default, as
-- LuaSocket's) closes.
-- @string[opt="both"] how
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:shutdown(how) end

--- Sets a socket option by LuaSocket's name: `"tcp-nodelay"`,
-- `"keepalive"`, `"reuseaddr"` (booleans) or `"linger"` (`{on =, timeout =}`,
-- seconds).
-- @string name
-- @param value
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:setoption(name, value) end

--- Puts a stream that `tcpclient.connect` made back into its pool instead
-- of closing it (OpenResty's setkeepalive, in seconds). Do not use the
-- stream after. A stream with unread bytes, or closed, is not kept.
-- @number[opt=60] idle_timeout seconds it may wait idle (0: no limit)
-- @int[opt=30] pool_size the most idle streams the pool keeps
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:set_keepalive(idle_timeout, pool_size) end

--- How many times the pool handed this stream out again.
-- @treturn int
function IOStream:getreusedtimes() end

--- A socket option's value (see `setoption`).
-- @string name
-- @return[1] the value: a boolean, or `{on =, timeout =}` for `"linger"`
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:getoption(name) end

--- The peer's address.
-- @treturn[1] string host (a path for a unix socket)
-- @treturn[1] int port (0 for a unix socket)
-- @treturn[1] string family `"inet"`, `"inet6"` or `"unix"`
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:getpeername() end

--- This end's address, as @{getpeername}.
function IOStream:getsockname() end

--- What is buffered.
-- @treturn int bytes buffered for reading
-- @treturn int bytes written but not yet handed to the kernel
-- @treturn int bytes the stream's own read buffer holds allocated (0 for
-- none: an idle stream reads into a buffer its loop shares)
function IOStream:buffer_sizes() end

--- TLS.
-- @section tls

--- Waits for the TLS handshake (the first read waits for it too).
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string `"tls: <reason>"`
function IOStream:wait_for_handshake() end

--- Upgrades a plain stream in place (STARTTLS) and waits for the handshake.
-- Raises while a read or write is pending or plain data is buffered.
-- @bool server_side
-- @tparam table|context ssl_options see `tcpserver.ssl`
-- @string[opt] server_hostname for SNI and host name verification (client)
-- @treturn[1] boolean true
-- @treturn[2] nil
-- @treturn[2] string err
function IOStream:start_tls(server_side, ssl_options, server_hostname) end

--- The peer's certificate, or nil (a plain stream, or no certificate).
--
-- `subject` and `issuer` are RFC 2253 strings, as OpenSSL's
-- `X509_NAME_print_ex(..., XN_FLAG_RFC2253)` writes them: the most
-- specific part first (`CN=...` before `O=...` before `C=...`), parts
-- separated by `,`, multi-valued parts joined by `+`, the characters
-- `, + " \ < > ;` escaped with a backslash, and bytes above 127 (UTF-8)
-- as `\XX` in hex: `CN=caf\C3\A9,O=Example\, Inc.,C=FR`.
-- @treturn table `{subject=, issuer=, serial=, not_before=, not_after=,
-- pem=, verified=}`: `serial` in upper-case hex, the times as Unix
-- seconds, `pem` the certificate, `verified` true when its chain was
-- verified (a server with verify "optional" or "required", or a
-- verifying client)
function IOStream:peer_certificate() end

--- The protocol ALPN picked, or nil.
-- @treturn ?string
function IOStream:alpn_protocol() end

--- The TLS version once the handshake is done (`"TLSv1.3"`), or nil.
-- @treturn ?string
function IOStream:tls_version() end

--- The cipher once the handshake is done, or nil.
-- @treturn ?string
function IOStream:cipher() end

--- The host name the client asked for with SNI (on a client: the name it
-- sent), or nil; a server picks a certificate by it with `sni` or
-- `sni_callback` in ssl_options. Nil once the stream is closed.
-- @treturn ?string
function IOStream:server_name() end

return IOStream
