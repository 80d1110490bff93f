--- TLS contexts from ssl_options (Tornado's names; LuaSec's accepted too).
-- One context (one SSL_CTX) serves every connection it is used for.
-- Errors name the option; they carry no position, as they are raised
-- wherever ssl_options arrive (a server, connect, start_tls).
local core = require "tcpserver.core"

local M = {}

local ALIASES = {certificate = "certfile", key = "keyfile", cafile = "cafile"}

local KINDS = {
  certfile = "string", keyfile = "string", cafile = "string", ciphers = "string",
  verify = "string", min_version = "string", alpn = "table", sni = "table",
}

local VERIFY = {none = true, optional = true, required = true}

local CONTEXT = debug.getregistry()["tcpserver.ssl_context"]

local function readable(path, what)
  local f = io.open(path, "r")
  if not f then error(("ssl_options: cannot read %s %s"):format(what, path), 0) end
  f:close()
end

local function normalize(opts)
  if type(opts) ~= "table" then error("ssl_options: table or context expected, got " .. type(opts), 0) end
  local out = {}
  for k, v in pairs(opts) do
    local name = ALIASES[k] or k
    local kind = KINDS[name]
    if not kind then error("ssl_options: unknown option '" .. tostring(k) .. "'", 0) end
    if type(v) ~= kind then
      error(("ssl_options: '%s' must be a %s, got %s"):format(k, kind, type(v)), 0)
    end
    out[name] = v
  end
  if out.verify and not VERIFY[out.verify] then
    error("ssl_options: verify must be \"none\", \"optional\" or \"required\", got '" .. out.verify .. "'", 0)
  end
  for _, k in ipairs {"certfile", "keyfile", "cafile"} do
    if out[k] then readable(out[k], k) end
  end
  for name, pair in pairs(out.sni or {}) do
    if type(name) ~= "string" or type(pair) ~= "table" or type(pair.certfile or pair.certificate) ~= "string" then
      error("ssl_options: sni must map host names to {certfile=, keyfile=}", 0)
    end
    pair = {certfile = pair.certfile or pair.certificate, keyfile = pair.keyfile or pair.key}
    readable(pair.certfile, "sni certfile")
    out.sni[name] = pair
  end
  return out
end

--- Builds a reusable context; raises a clear error for bad options.
function M.context(opts)
  return core.ssl_context(normalize(opts))
end

function M.is_context(x)
  return getmetatable(x) == CONTEXT
end

--- A context from ssl_options that may already be one.
function M.wrap(x)
  if M.is_context(x) then return x end
  return core.ssl_context(normalize(x))
end

--- A context fit for a server: it must have a certificate.
function M.server_context(x)
  local ctx = M.wrap(x)
  if not ctx:has_certificate() then
    error("ssl_options: a server needs certfile (and keyfile)", 0)
  end
  return ctx
end

return M
