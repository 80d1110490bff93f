--- TLS contexts from ssl_options (Tornado's names; LuaSec's accepted too).
-- One context (one SSL_CTX) serves every connection it is used for.
-- Errors name the option; they carry no position, as they are raised
-- wherever ssl_options arrive (a server, connect, start_tls).
--
-- LuaSec's names are translated here, before the C core sees the table:
-- `certificate`/`key` are `certfile`/`keyfile`; `verify` may be LuaSec's
-- list (`{"peer"}`, `{"peer", "fail_if_no_peer_cert"}`, `{"none"}`);
-- `protocol` ("tlsv1_2", "tlsv1_3", "any") becomes a min_version;
-- `capath` is a hashed CA directory; `options` accepts LuaSec's
-- flags that are already the default or that raise the minimum version.
-- @module tcpserver.ssl
local core = require "tcpserver.core"

local M = {}

local ALIASES = {certificate = "certfile", key = "keyfile"}

local KINDS = {
  certfile = "string", keyfile = "string", cafile = "string", capath = "string",
  ciphers = "string", verify = {string = true, table = true}, min_version = "string",
  protocol = "string", options = {string = true, table = true}, alpn = "table", sni = "table",
  sni_callback = "function", session_tickets = "number",
}

local VERIFY = {none = true, optional = true, required = true}

--- The names min_version accepts, oldest first.
M.VERSIONS = {"tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"}
local VERSION_RANK = {}
for i, v in ipairs(M.VERSIONS) do VERSION_RANK[v] = i end

-- LuaSec's protocol names. tcpserver only sets a floor: a protocol pins
-- LuaSec to one version, here it is the least one, and a newer version
-- the peer offers is still negotiated (a ceiling only ever weakens TLS).
local PROTOCOL = {
  any = false, sslv23 = false, tlsv1 = "tlsv1", tlsv1_1 = "tlsv1.1",
  tlsv1_2 = "tlsv1.2", tlsv1_3 = "tlsv1.3",
}

-- LuaSec's `options` flags: those that OpenSSL 3 (or tcpserver's
-- contexts) already apply are accepted and change nothing; the no_tlsv*
-- ones raise min_version. Any other flag is refused rather than ignored.
local OPTIONS_DEFAULT = {
  all = true, no_sslv2 = true, no_sslv3 = true, no_compression = true,
  single_dh_use = true, single_ecdh_use = true, no_renegotiation = true,
}
local OPTIONS_FLOOR = {no_tlsv1 = "tlsv1.1", no_tlsv1_1 = "tlsv1.2", no_tlsv1_2 = "tlsv1.3"}

-- The directory OpenSSL's default verify paths read: capath naming it is
-- the system store that a context without cafile already trusts.
local SYSTEM_CAPATHS = {["/etc/ssl/certs"] = true, ["/etc/ssl/certs/"] = true,
                        ["/usr/lib/ssl/certs"] = true, ["/usr/lib/ssl/certs/"] = true}

local CONTEXT = require("tcpserver.core").ssl_context_mt

-- What each context was built from (for the server-side checks).
local built_from = setmetatable({}, {__mode = "k"})

local function fail(fmt, ...)
  error("ssl_options: " .. fmt:format(...), 0)
end

local function read_file(path, what)
  local f = io.open(path, "r")
  if not f then fail("cannot read %s %s", what, path) end
  local data = f:read("a")
  f:close()
  return data
end

local function list_names(t)
  local names = {}
  for k in pairs(t) do names[#names + 1] = k end
  table.sort(names)
  return table.concat(names, ", ")
end

local function check_kind(k, v)
  local kind = KINDS[k]
  if type(kind) == "table" then
    if not kind[type(v)] then fail("'%s' must be a string or a list, got %s", k, type(v)) end
  elseif type(v) ~= kind then
    fail("'%s' must be a %s, got %s", k, kind, type(v))
  end
end

-- LuaSec's verify list -> Tornado's word.
local function verify_word(v)
  if type(v) == "string" then
    if v == "peer" then return "optional" end
    if v == "fail_if_no_peer_cert" then return "required" end
    if VERIFY[v] then return v end
  else
    local set = {}
    for _, flag in ipairs(v) do set[flag] = true end
    if set.none and not set.peer then return "none" end
    if set.peer then
      return set.fail_if_no_peer_cert and "required" or "optional"
    end
  end
  fail("verify must be \"none\", \"optional\" or \"required\" (or LuaSec's "
       .. "{\"peer\"}, {\"peer\", \"fail_if_no_peer_cert\"}, {\"none\"}), got %s",
       type(v) == "string" and "'" .. v .. "'" or "{" .. table.concat(v, ", ") .. "}")
end

local function raise_floor(out, version)
  if not out.min_version or VERSION_RANK[version] > (VERSION_RANK[out.min_version] or 0) then
    out.min_version = version
  end
end

local function apply_options(out, flags)
  if type(flags) == "string" then flags = {flags} end
  for _, flag in ipairs(flags) do
    if OPTIONS_FLOOR[flag] then
      raise_floor(out, OPTIONS_FLOOR[flag])
    elseif not OPTIONS_DEFAULT[flag] then
      fail("options: '%s' is not supported (accepted: %s, %s)", tostring(flag),
           list_names(OPTIONS_FLOOR), list_names(OPTIONS_DEFAULT))
    end
  end
end

local function check_key(out)
  if out.keyfile or not out.certfile then return end
  -- Without keyfile the key is read from certfile: say so when it is not there.
  if not read_file(out.certfile, "certfile"):find("PRIVATE KEY-----", 1, true) then
    fail("keyfile is missing: certfile %s holds no private key (give keyfile = \"...\")",
         out.certfile)
  end
end

local build, sni_adapter

-- The core calls sni_callback(server_name) during the handshake and takes
-- a context or nil; the user's function may also return ssl_options (a
-- table), built once per table. It must not wait (it runs inside OpenSSL).
function sni_adapter(fn)
  local built = setmetatable({}, {__mode = "k"})
  return function(name)
    local r = fn(name)
    if type(r) == "table" and not M.is_context(r) then
      built[r] = built[r] or build(r)
      r = built[r]
    end
    return r
  end
end

local function normalize(opts)
  if type(opts) ~= "table" then fail("table or context expected, got %s", type(opts)) end
  local out, given = {}, {}
  for k, v in pairs(opts) do
    local name = ALIASES[k] or k
    if not KINDS[name] then fail("unknown option '%s'", tostring(k)) end
    if given[name] then
      local a, b = given[name], k
      if a > b then a, b = b, a end
      fail("'%s' and '%s' are the same option", a, b)
    end
    check_kind(name, v)
    given[name] = k
    out[name] = v
  end
  if out.verify ~= nil then out.verify = verify_word(out.verify) end
  if out.min_version and not VERSION_RANK[out.min_version] then
    fail("unknown min_version '%s' (valid: %s)", out.min_version, table.concat(M.VERSIONS, ", "))
  end
  if out.protocol then
    local floor = PROTOCOL[out.protocol]
    if floor == nil then
      fail("unknown protocol '%s' (LuaSec's names: any, tlsv1_2, tlsv1_3; or use min_version)",
           out.protocol)
    end
    if floor then raise_floor(out, floor) end
    out.protocol = nil
  end
  if out.options then
    apply_options(out, out.options)
    out.options = nil
  end
  if out.capath and SYSTEM_CAPATHS[out.capath] then
    out.capath = nil -- the default verify paths already read it
  end
  for _, k in ipairs {"certfile", "keyfile", "cafile"} do
    if out[k] then read_file(out[k], k) end
  end
  check_key(out)
  if out.sni_callback then out.sni_callback = sni_adapter(out.sni_callback) end
  for name, pair in pairs(out.sni or {}) do
    if type(name) ~= "string" or type(pair) ~= "table" or type(pair.certfile or pair.certificate) ~= "string" then
      fail("sni must map host names to {certfile=, keyfile=}")
    end
    pair = {certfile = pair.certfile or pair.certificate, keyfile = pair.keyfile or pair.key}
    read_file(pair.certfile, "sni certfile")
    check_key(pair)
    out.sni[name] = pair
  end
  return out
end

function build(opts)
  local normalized = normalize(opts)
  local ctx = core.ssl_context(normalized)
  built_from[ctx] = normalized
  return ctx
end

--- Builds a reusable context; raises a clear error for bad options.
-- @tparam table opts ssl_options
-- @return a context, accepted wherever ssl_options is
function M.context(opts)
  return build(opts)
end

--- Whether `x` is a context made by @{context}.
function M.is_context(x)
  return getmetatable(x) == CONTEXT
end

--- A context from ssl_options that may already be one.
function M.wrap(x)
  if M.is_context(x) then return x end
  return build(x)
end

--- A context fit for a server: it must have a certificate, and verifying
-- client certificates needs the CAs that sign them.
function M.server_context(x)
  local ctx = M.wrap(x)
  if not ctx:has_certificate() then
    fail("a server needs certfile (and keyfile)")
  end
  local opts = built_from[ctx]
  if opts and (opts.verify == "required" or opts.verify == "optional")
      and not opts.cafile and not opts.capath then
    fail("verify = \"%s\" on a server needs cafile (or capath): the CAs that sign the "
         .. "client certificates", opts.verify)
  end
  return ctx
end

return M
