/* OpenSSL contexts: certificates, verification, ALPN, SNI by name or by
 * sni_callback, protocol floor, session tickets; the TLS layer that uses
 * them is tls.c. */
#include "tls_int.h"

#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* ---- contexts ---- */

ts_ctx *ts__tls_check_ctx(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, TS_CTX_MT);
}

static int ctx_gc(lua_State *L) {
  ts_ctx *c = ts__tls_check_ctx(L, 1);
  int i;

  for (i = 0; i < c->nsni; i++) {
    SSL_CTX_free(c->sni_ctx[i]);
    free(c->sni_names[i]);
  }
  free(c->sni_ctx);
  free(c->sni_names);
  c->nsni = 0;
  c->sni_ctx = NULL;
  c->sni_names = NULL;
  SSL_CTX_free(c->ctx); /* connections hold their own reference */
  c->ctx = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, c->sni_cb_ref);
  c->sni_cb_ref = LUA_NOREF;
  return 0;
}

static int raise_ssl(lua_State *L, const char *fmt, const char *arg) {
  char reason[160];
  ts__tls_reason(reason, sizeof(reason));
  return luaL_error(L, fmt, arg, reason);
}

/* The ClientHello's server name, kept for decrypt_ticket: OpenSSL
 * decrypts a ticket while it parses the hello, before
 * SSL_get_servername knows the name. */
static int client_hello(SSL *ssl, int *alert, void *arg) {
  ts_tls *t = SSL_get_app_data(ssl);
  const unsigned char *p;
  size_t len, n;

  (void)alert, (void)arg;
  if (t == NULL)
    return SSL_CLIENT_HELLO_SUCCESS;
  t->hello_name[0] = '\0';
  /* server_name: list length (2), type (1: 0 = host_name), length (2), name */
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p, &len) && len >= 5 &&
      p[2] == TLSEXT_NAMETYPE_host_name) {
    n = (size_t)p[3] << 8 | p[4];
    if (n <= len - 5 && n < sizeof(t->hello_name)) {
      memcpy(t->hello_name, p + 5, n);
      t->hello_name[n] = '\0';
    }
  }
  return SSL_CLIENT_HELLO_SUCCESS;
}

/* A session resumes only under the name it was made for. Tickets are
 * sealed with the main context's keys and OpenSSL does not compare a
 * resumed session's name with the new SNI; a resumed handshake asks for
 * no certificate. So a ticket got on a name that verifies nothing let a
 * client in, without a certificate, on a name whose sni_callback context
 * required one. Such a ticket is ignored: a full handshake follows. */
static SSL_TICKET_RETURN decrypt_ticket(SSL *ssl, SSL_SESSION *session,
                                        const unsigned char *keyname, size_t keyname_len,
                                        SSL_TICKET_STATUS status, void *arg) {
  ts_tls *t = SSL_get_app_data(ssl);
  const char *now = t != NULL ? t->hello_name : "", *then;

  (void)keyname, (void)keyname_len, (void)arg;
  switch (status) {
  case SSL_TICKET_SUCCESS: /* only then is there a session */
  case SSL_TICKET_SUCCESS_RENEW:
    then = session != NULL ? SSL_SESSION_get0_hostname(session) : NULL;
    if (session == NULL || strcasecmp(now, then != NULL ? then : "") != 0)
      return SSL_TICKET_RETURN_IGNORE_RENEW;
    return status == SSL_TICKET_SUCCESS ? SSL_TICKET_RETURN_USE
                                        : SSL_TICKET_RETURN_USE_RENEW;
  case SSL_TICKET_EMPTY:
  case SSL_TICKET_NO_DECRYPT: return SSL_TICKET_RETURN_IGNORE_RENEW;
  default: return SSL_TICKET_RETURN_ABORT;
  }
}

static SSL_CTX *new_ssl_ctx(lua_State *L) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_method());

  if (ctx == NULL)
    raise_ssl(L, "ssl_options: %s%s", "cannot create a context: ");
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  /* Idle connections give their record buffers back. The chain sent is
   * the certfile's: building it from the trust store read every file of
   * /etc/ssl/certs on each handshake (29% of a handshake's CPU). */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
  /* Tickets only (see decrypt_ticket): no server-side session cache,
   * which would resume by session id past that check. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT);
  SSL_CTX_set_session_ticket_cb(ctx, NULL, decrypt_ticket, NULL);
  SSL_CTX_set_client_hello_cb(ctx, client_hello, NULL);
  return ctx;
}

static void load_pair(lua_State *L, SSL_CTX *ctx, const char *cert, const char *key) {
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
    raise_ssl(L, "ssl_options: cannot load certfile %s: %s", cert);
  if (SSL_CTX_use_PrivateKey_file(ctx, key ? key : cert, SSL_FILETYPE_PEM) != 1) {
    if (ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH)
      raise_ssl(L, "ssl_options: keyfile %s does not match the certificate: %s",
                key ? key : cert);
    raise_ssl(L, "ssl_options: cannot load keyfile %s: %s", key ? key : cert);
  }
  if (SSL_CTX_check_private_key(ctx) != 1)
    raise_ssl(L, "ssl_options: keyfile %s does not match the certificate: %s",
              key ? key : cert);
}

static const char *opt_string(lua_State *L, int t, const char *k) {
  const char *v;
  lua_getfield(L, t, k);
  v = lua_tostring(L, -1); /* the table keeps it alive */
  lua_pop(L, 1);
  return v;
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned inlen, void *arg) {
  ts_ctx *c = arg;
  const unsigned char *p, *q;

  (void)ssl;
  for (p = c->alpn; p < c->alpn + c->alpn_len; p += 1 + *p) {
    for (q = in; q < in + inlen; q += 1 + *q) {
      if (*p == *q && memcmp(p + 1, q + 1, *p) == 0) {
        *out = q + 1;
        *outlen = *q;
        return SSL_TLSEXT_ERR_OK;
      }
    }
  }
  return SSL_TLSEXT_ERR_NOACK;
}

/* Reading the system store takes ~45 ms: only a verifying side pays. */
void ts__tls_load_default_paths(ts_ctx *c) {
  if (c->default_paths) {
    SSL_CTX_set_default_verify_paths(c->ctx);
    c->default_paths = 0;
  }
}

/* How much a verify mode asks of a client: none, a valid certificate if
 * one is sent, a valid certificate. */
static int strictness(int mode) {
  return !(mode & SSL_VERIFY_PEER)                   ? 0
         : !(mode & SSL_VERIFY_FAIL_IF_NO_PEER_CERT) ? 1
                                                     : 2;
}

/* Moves a server connection to the context sni_callback chose. It never
 * verifies less than the server asks: the stricter of the two modes
 * holds. A context that names no CAs of its own checks certificates
 * against the server's, and asks for the server's. */
static void switch_ctx(SSL *ssl, ts_ctx *main, ts_ctx *sub) {
  int mode = SSL_get_verify_mode(ssl);
  STACK_OF(X509_NAME) * names;

  if (sub->verify >= 0 && strictness(sub->verify) > strictness(mode))
    mode = sub->verify;
  SSL_set_SSL_CTX(ssl, sub->ctx);
  SSL_set_verify(ssl, mode, NULL);
  if (!(mode & SSL_VERIFY_PEER) || sub->has_ca)
    return;
  if (!main->has_ca) { /* neither names CAs: the system's */
    ts__tls_load_default_paths(sub);
    return;
  }
  SSL_set1_verify_cert_store(ssl, SSL_CTX_get_cert_store(main->ctx));
  names = SSL_CTX_get_client_CA_list(main->ctx);
  if (names != NULL)
    SSL_set_client_CA_list(ssl, SSL_dup_CA_list(names));
}

/* sni_callback(name) -> context or nil, called inside the handshake. The
 * chosen context brings its own certificate and verify settings; the
 * connection anchors it until it closes. */
static int sni_call(SSL *ssl, ts_ctx *c, const char *name, int *alert) {
  ts_tls *t = SSL_get_app_data(ssl);
  lua_State *L = loop_of(t)->L;
  int top = lua_gettop(L), ok = 1;
  ts_ctx *sub;

  lua_rawgeti(L, LUA_REGISTRYINDEX, c->sni_cb_ref);
  lua_pushstring(L, name);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    char msg[300];
    snprintf(msg, sizeof(msg), "sni_callback(%s) failed: %s", name,
             lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object)");
    ts__report(loop_of(t), msg);
    ok = 0;
  } else if ((sub = luaL_testudata(L, -1, TS_CTX_MT)) != NULL && sub->ctx != NULL) {
    switch_ctx(ssl, c, sub);
    luaL_unref(L, LUA_REGISTRYINDEX, t->sni_ref);
    t->sni_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else if (!lua_isnil(L, -1)) {
    ts__report(loop_of(t), "sni_callback must return an ssl context, ssl_options or nil");
    ok = 0;
  }
  lua_settop(L, top);
  if (ok)
    return SSL_TLSEXT_ERR_OK;
  *alert = SSL_AD_INTERNAL_ERROR;
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static int sni_select(SSL *ssl, int *alert, void *arg) {
  ts_ctx *c = arg;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  int i;

  for (i = 0; name != NULL && i < c->nsni; i++) {
    if (strcasecmp(name, c->sni_names[i]) == 0) {
      SSL_set_SSL_CTX(ssl, c->sni_ctx[i]);
      return SSL_TLSEXT_ERR_OK;
    }
  }
  if (name != NULL && c->sni_cb_ref != LUA_NOREF)
    return sni_call(ssl, c, name, alert);
  return SSL_TLSEXT_ERR_OK;
}

static void set_alpn(lua_State *L, ts_ctx *c, int t) {
  lua_Integer i, n;
  size_t len;
  const char *p;

  lua_getfield(L, t, "alpn");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  n = luaL_len(L, -1);
  for (i = 1; i <= n; i++) {
    lua_geti(L, -1, i);
    p = lua_tolstring(L, -1, &len);
    if (p == NULL || len == 0 || len > 255 || c->alpn_len + 1 + len > sizeof(c->alpn))
      luaL_error(L, "ssl_options: bad alpn protocol #%d", (int)i);
    c->alpn[c->alpn_len] = (unsigned char)len;
    memcpy(c->alpn + c->alpn_len + 1, p, len);
    c->alpn_len += 1 + (unsigned)len;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  /* Client side: offer them; server side: pick by our preference. */
  SSL_CTX_set_alpn_protos(c->ctx, c->alpn, c->alpn_len);
  SSL_CTX_set_alpn_select_cb(c->ctx, alpn_select, c);
}

/* A connection switched to a per-name context verifies client certificates
 * with that context's store: give it the main context's CAs. */
static void share_verify(SSL_CTX *main, SSL_CTX *sub) {
  X509_STORE *store = SSL_CTX_get_cert_store(main);
  STACK_OF(X509_NAME) *names = SSL_CTX_get_client_CA_list(main);

  X509_STORE_up_ref(store);
  SSL_CTX_set_cert_store(sub, store);
  if (names != NULL)
    SSL_CTX_set_client_CA_list(sub, SSL_dup_CA_list(names));
}

/* sni = {["host"] = {certfile=, keyfile=}, ...} */
static void set_sni(lua_State *L, ts_ctx *c, int t) {
  int n = 0;

  lua_getfield(L, t, "sni");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }
  for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1))
    n++;
  c->sni_names = calloc((size_t)n, sizeof(char *));
  c->sni_ctx = calloc((size_t)n, sizeof(SSL_CTX *));
  if (n > 0 && (c->sni_names == NULL || c->sni_ctx == NULL))
    luaL_error(L, "ssl_options: out of memory");
  for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
    const char *name = lua_tostring(L, -2);
    SSL_CTX *sub = new_ssl_ctx(L);
    c->sni_ctx[c->nsni] = sub;
    c->sni_names[c->nsni++] = strdup(name);
    if (c->sni_names[c->nsni - 1] == NULL)
      luaL_error(L, "ssl_options: out of memory");
    load_pair(L, sub, opt_string(L, -1, "certfile"), opt_string(L, -1, "keyfile"));
    share_verify(c->ctx, sub);
    if (c->alpn_len > 0)
      SSL_CTX_set_alpn_select_cb(sub, alpn_select, c);
  }
  lua_pop(L, 1);
  SSL_CTX_set_tlsext_servername_callback(c->ctx, sni_select);
  SSL_CTX_set_tlsext_servername_arg(c->ctx, c);
}

static void set_verify(lua_State *L, ts_ctx *c, int t) {
  const char *verify = opt_string(L, t, "verify");
  const char *cafile = opt_string(L, t, "cafile");
  const char *capath = opt_string(L, t, "capath");
  struct stat st;

  c->verify = -1;
  if (verify != NULL)
    c->verify = strcmp(verify, "none") == 0 ? SSL_VERIFY_NONE
                : strcmp(verify, "optional") == 0
                    ? SSL_VERIFY_PEER
                    : SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
  if (cafile != NULL) {
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(cafile);
    if (SSL_CTX_load_verify_locations(c->ctx, cafile, NULL) != 1 || names == NULL) {
      sk_X509_NAME_pop_free(names, X509_NAME_free);
      raise_ssl(L, "ssl_options: cannot load cafile %s: %s", cafile);
    }
    SSL_CTX_set_client_CA_list(c->ctx, names);
  }
  if (capath != NULL) { /* a hashed directory (openssl rehash), read lazily */
    if (stat(capath, &st) != 0 || !S_ISDIR(st.st_mode))
      luaL_error(L, "ssl_options: capath %s is not a directory", capath);
    if (SSL_CTX_load_verify_locations(c->ctx, NULL, capath) != 1)
      raise_ssl(L, "ssl_options: cannot use capath %s: %s", capath);
  }
  c->default_paths = cafile == NULL && capath == NULL; /* ts__tls_load_default_paths */
  c->has_ca = !c->default_paths;
}

static void set_protocol(lua_State *L, ts_ctx *c, int t) {
  static const char *const names[] = {"tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3", NULL};
  static const int versions[] = {TLS1_VERSION, TLS1_1_VERSION, TLS1_2_VERSION,
                                 TLS1_3_VERSION};
  const char *min = opt_string(L, t, "min_version");
  const char *ciphers = opt_string(L, t, "ciphers");
  int i;

  for (i = 0; min != NULL && names[i] != NULL; i++) {
    if (strcmp(min, names[i]) == 0)
      break;
  }
  if (min != NULL && names[i] == NULL)
    luaL_error(L, "ssl_options: unknown min_version '%s'", min);
  if (min != NULL)
    SSL_CTX_set_min_proto_version(c->ctx, versions[i]);
  if (ciphers != NULL && SSL_CTX_set_cipher_list(c->ctx, ciphers) != 1)
    raise_ssl(L, "ssl_options: bad ciphers '%s': %s", ciphers);
}

/* TLS 1.3 session tickets a server sends after a full handshake: OpenSSL
 * makes 2, each an encryption a client that never resumes does not use;
 * one lets a client resume. ssl_options.session_tickets sets it (0: none). */
#define DEFAULT_TICKETS 1

static void set_tickets(lua_State *L, ts_ctx *c, int t) {
  lua_Integer n = DEFAULT_TICKETS;

  if (lua_getfield(L, t, "session_tickets") != LUA_TNIL)
    n = luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  if (n < 0 || n > 16)
    luaL_error(L, "ssl_options: session_tickets must be from 0 to 16");
  SSL_CTX_set_num_tickets(c->ctx, (size_t)n);
}

/* core.ssl_context(opts): opts already checked and normalized in Lua. */
static int l_ssl_context(lua_State *L) {
  ts_ctx *c;
  const char *cert, *key;

  luaL_checktype(L, 1, LUA_TTABLE);
  c = lua_newuserdatauv(L, sizeof(*c), 0);
  memset(c, 0, sizeof(*c));
  c->sni_cb_ref = LUA_NOREF;
  luaL_setmetatable(L, TS_CTX_MT);
  c->ctx = new_ssl_ctx(L);
  cert = opt_string(L, 1, "certfile");
  key = opt_string(L, 1, "keyfile");
  if (cert != NULL) {
    load_pair(L, c->ctx, cert, key);
    c->has_cert = 1;
  } else if (key != NULL) {
    luaL_error(L, "ssl_options: keyfile given without certfile");
  }
  set_protocol(L, c, 1);
  set_verify(L, c, 1);
  set_alpn(L, c, 1);
  set_sni(L, c, 1);
  set_tickets(L, c, 1);
  if (lua_getfield(L, 1, "sni_callback") == LUA_TFUNCTION) {
    c->sni_cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    SSL_CTX_set_tlsext_servername_callback(c->ctx, sni_select);
    SSL_CTX_set_tlsext_servername_arg(c->ctx, c);
  } else {
    lua_pop(L, 1);
  }
  return 1;
}

static int ctx_has_certificate(lua_State *L) {
  lua_pushboolean(L, ts__tls_check_ctx(L, 1)->has_cert);
  return 1;
}

static int ctx_tostring(lua_State *L) {
  lua_pushfstring(L, "tcpserver.ssl_context (%p)", (void *)ts__tls_check_ctx(L, 1));
  return 1;
}

int ts__tls_verify_mode(ts_ctx *c, int server) {
  return c->verify >= 0 ? c->verify : server ? SSL_VERIFY_NONE : SSL_VERIFY_PEER;
}

void ts__tls_open_ctx(lua_State *L) {
  static const luaL_Reg methods[] = {{"has_certificate", ctx_has_certificate},
                                     {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", ctx_gc}, {"__tostring", ctx_tostring}, {"__index", NULL}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"ssl_context", l_ssl_context}, {NULL, NULL}};

  luaL_newmetatable(L, TS_CTX_MT);
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "ssl_context_mt"); /* exported for ssl.lua */
  luaL_setfuncs(L, funcs, 0);
}
