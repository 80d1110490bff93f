/* TLS as a stream layer: OpenSSL over memory BIOs. Ciphertext read from
 * the socket is fed to the SSL object and the plaintext goes to the
 * stream's read buffer; what write() queued is encrypted when the stream
 * flushes, and the ciphertext leaves through the stream's write path. */
#define _DEFAULT_SOURCE /* timegm */
#include "tls.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define TS_CTX_MT "tcpserver.ssl_context"

typedef struct ts_ctx {
  SSL_CTX *ctx;
  int verify; /* SSL_VERIFY_* or -1: the side's default */
  int has_cert;
  unsigned char alpn[256]; /* protocols in wire format, in preference order */
  unsigned alpn_len;
  int nsni;
  char **sni_names;
  SSL_CTX **sni_ctx;
  int default_paths; /* the system CAs, loaded when first needed */
  int has_ca;        /* cafile or capath given */
  int sni_cb_ref;    /* sni_callback(server_name), or LUA_NOREF */
} ts_ctx;

typedef struct ts_tls {
  SSL *ssl;         /* freed at close */
  BIO *rbio, *wbio; /* owned by ssl */
  ts_stream *s;
  uv_timer_t *hs_timer;   /* handshake_timeout, until the handshake ends */
  uv_timer_t *wait_timer; /* set_timeout's limit on wait_for_handshake */
  ts_waiter hs;           /* the task in wait_for_handshake */
  int ctx_ref;
  int sni_ref; /* the context sni_callback chose, or LUA_NOREF */
  int server, done, failed, shutdown_sent, close_notify;
  char peer[INET6_ADDRSTRLEN + 8]; /* server side: the client, for logs */
  size_t rx;                       /* ciphertext bytes received */
  ts_buf xbuf;                     /* ciphertext waiting to be written */
  char err[160];                   /* "tls: <reason>" once failed */
} ts_tls;

static const ts_layer_ops tls_ops;

/* SSL objects alive in this process: freed at close, not at collection,
 * which cannot see their memory (core.tls_live() reports it). */
static long live_ssl;

static void free_ssl(ts_tls *t) {
  if (t->ssl == NULL)
    return;
  SSL_free(t->ssl);
  t->ssl = NULL;
  live_ssl--;
}

static ts_loop *loop_of(ts_tls *t) {
  return ts__stream_loop(t->s);
}

/* ---- errors ---- */

/* The newest OpenSSL error as a short reason, clearing the queue. */
static const char *ssl_reason(char *buf, size_t len) {
  unsigned long e = ERR_peek_last_error();
  const char *r = e ? ERR_reason_error_string(e) : NULL;

  snprintf(buf, len, "%s", r ? r : "protocol error");
  ERR_clear_error();
  return buf;
}

/* Ends the connection after a TLS failure, with one info line unless the
 * peer sent nothing at all (a port probe). */
static void tls_fail(ts_tls *t, const char *reason) {
  char msg[256];

  if (t->failed || ts__stream_closed(t->s))
    return;
  t->failed = 1;
  snprintf(t->err, sizeof(t->err), "tls: %s", reason);
  if (t->server && !t->done && ts__stream_counters(t->s) != NULL)
    ts__stream_counters(t->s)->tls_handshake_failures++;
  if (t->server && t->rx > 0) {
    snprintf(msg, sizeof(msg), "TLS %s with %s: %s",
             t->done ? "error" : "handshake failed", t->peer, reason);
    ts__log(loop_of(t), "info", msg);
  }
  ts__stream_fail(t->s, UV_EPROTO); /* sends the alert OpenSSL queued */
}

static const char *tls_error(void *layer) {
  ts_tls *t = layer;
  return t->failed ? t->err : NULL;
}

/* ---- moving bytes ---- */

/* Moves the ciphertext OpenSSL produced into xbuf. */
static int move_out(ts_tls *t) {
  size_t pending = BIO_ctrl_pending(t->wbio);
  int n;

  if (pending == 0)
    return 0;
  if (ts_buf_reserve(&t->xbuf, pending, (size_t)-1) != 0)
    return UV_ENOMEM;
  n = BIO_read(t->wbio, ts_buf_tail(&t->xbuf), (int)pending);
  if (n > 0)
    t->xbuf.end += (uint32_t)n;
  return 0;
}

/* Before the handshake ends, written bytes wait in the stream's buffer. */
static int tls_encode(ts_stream *s, void *layer) {
  ts_tls *t = layer;
  ts_buf *plain = ts__stream_plain(s);
  size_t len;
  int n;

  while (t->done && !t->failed && !t->shutdown_sent && t->ssl != NULL &&
         (len = ts_buf_len(plain)) > 0) {
    n = SSL_write(t->ssl, ts_buf_head(plain), len > 1 << 30 ? 1 << 30 : (int)len);
    if (n <= 0) {
      ERR_clear_error();
      return UV_EPROTO;
    }
    ts_buf_consume(plain, (size_t)n);
  }
  return t->ssl != NULL ? move_out(t) : 0;
}

static ts_buf *tls_output(void *layer) {
  return &((ts_tls *)layer)->xbuf;
}

/* Decrypts what OpenSSL holds into the read buffer, up to max_buffer_size
 * (the rest waits inside OpenSSL: backpressure). */
static void read_plain(ts_tls *t) {
  char reason[120], *p;
  size_t room;
  int n;

  while ((p = ts__stream_read_space(t->s, &room)) != NULL) {
    n = SSL_read(t->ssl, p, room > 1 << 30 ? 1 << 30 : (int)room);
    if (n > 0) {
      ts__stream_read_commit(t->s, (size_t)n);
      continue;
    }
    switch (SSL_get_error(t->ssl, n)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE: return;
    case SSL_ERROR_ZERO_RETURN: t->close_notify = 1; return;
    default: tls_fail(t, ssl_reason(reason, sizeof(reason))); return;
    }
  }
}

static void handshake_done(ts_tls *t) {
  t->done = 1;
  if (t->hs_timer != NULL)
    uv_timer_stop(t->hs_timer);
}

/* Advances the handshake; returns 0, or -1 once it failed. */
static int handshake(ts_tls *t) {
  char reason[200];
  long verify;
  int r = SSL_do_handshake(t->ssl);

  if (r == 1) {
    handshake_done(t);
    return 0;
  }
  switch (SSL_get_error(t->ssl, r)) {
  case SSL_ERROR_WANT_READ:
  case SSL_ERROR_WANT_WRITE: return 0;
  }
  verify = SSL_get_verify_result(t->ssl);
  if (verify != X509_V_OK) {
    ERR_clear_error();
    snprintf(reason, sizeof(reason), "certificate verify failed (%s)",
             X509_verify_cert_error_string(verify));
  } else {
    ssl_reason(reason, sizeof(reason));
  }
  tls_fail(t, reason);
  return -1;
}

/* Wakes wait_for_handshake once the handshake is settled either way. A
 * finished handshake is a success even if the peer has closed since. */
static void settle_handshake(ts_tls *t) {
  if (!ts_waiter_waiting(&t->hs))
    return;
  if (t->wait_timer != NULL)
    uv_timer_stop(t->wait_timer);
  if (t->done && !t->failed) {
    lua_pushboolean(t->hs.co, 1);
    ts_waiter_wake(&t->hs, 1);
  } else if (t->failed || ts__stream_closed(t->s)) {
    ts_waiter_wake_error(&t->hs, ts__stream_error(t->s));
  }
}

static void tls_on_read(ts_stream *s, void *layer, const char *data, size_t n) {
  ts_tls *t = layer;
  int was_done = t->done;

  t->rx += n;
  if (BIO_write(t->rbio, data, (int)n) != (int)n) {
    ts__stream_close(s, UV_ENOMEM);
    return;
  }
  if (!t->done)
    handshake(t);
  if (t->done && !t->failed)
    read_plain(t);
  ts__stream_flush(s); /* handshake messages, alerts, buffered writes */
  if (t->close_notify)
    ts__stream_on_eof(s);
  else
    ts__stream_on_data(s);
  if (t->done != was_done || t->failed)
    settle_handshake(t);
}

static void tls_on_eof(ts_stream *s, void *layer) {
  ts_tls *t = layer;

  if (t->done) { /* EOF without close_notify: the end of data all the same */
    ts__stream_on_eof(s);
    return;
  }
  if (t->rx == 0) { /* a port probe: no log */
    t->failed = 1;
    snprintf(t->err, sizeof(t->err), "closed");
    ts__stream_close(s, UV_EOF);
  } else {
    tls_fail(t, "connection closed during handshake");
  }
  settle_handshake(t);
}

/* A reset during the handshake is worth a line too (not a probe's). */
static void tls_on_error(ts_stream *s, void *layer, int err) {
  ts_tls *t = layer;
  char msg[200];

  (void)s;
  if (!t->server || t->done || t->failed || t->rx == 0)
    return;
  snprintf(msg, sizeof(msg), "TLS handshake failed with %s: %s", t->peer,
           uv_strerror(err));
  ts__log(loop_of(t), "info", msg);
}

static void tls_pump(ts_stream *s, void *layer) {
  ts_tls *t = layer;

  (void)s;
  if (t->done && !t->failed && t->ssl != NULL &&
      (SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->rbio) > 0))
    read_plain(t);
}

static void tls_shutdown(ts_stream *s, void *layer) {
  ts_tls *t = layer;

  if (!t->done || t->failed || t->shutdown_sent || t->ssl == NULL)
    return;
  if (tls_encode(s, t) != 0)
    return;
  t->shutdown_sent = 1;
  SSL_shutdown(t->ssl); /* queues close_notify; we do not wait for the peer's */
  ERR_clear_error();
}

/* ---- handshake timer, close and free ---- */

static void hs_timer_free(uv_handle_t *h) {
  free(h);
}

static void hs_timeout(uv_timer_t *timer) {
  ts_tls *t = timer->data;

  if (t->done || ts__stream_closed(t->s))
    return;
  t->rx += 1; /* a stalled handshake is worth its log line */
  tls_fail(t, "handshake timed out");
  settle_handshake(t);
}

/* set_timeout ran out in wait_for_handshake: the wait ends, the handshake
 * goes on (handshake_timeout bounds that). */
static void hs_wait_timeout(uv_timer_t *timer) {
  ts_tls *t = timer->data;

  if (ts_waiter_waiting(&t->hs))
    ts_waiter_wake_error(&t->hs, "timeout");
}

static void start_wait_timer(ts_tls *t) {
  uint64_t ms = ts__timeout_ms(ts__stream_timeout(t->s));

  if (ms == 0)
    return;
  if (t->wait_timer == NULL) {
    if ((t->wait_timer = malloc(sizeof(*t->wait_timer))) == NULL)
      return; /* no limit then, rather than no wait */
    uv_timer_init(loop_of(t)->uv, t->wait_timer);
    t->wait_timer->data = t;
  }
  uv_timer_start(t->wait_timer, hs_wait_timeout, ms, 0);
}

/* Native state goes at close: a collection cannot see its memory. */
static void tls_closed(ts_stream *s, void *layer) {
  ts_tls *t = layer;

  (void)s;
  ts_buf_free(&t->xbuf);
  free_ssl(t);
  luaL_unref(loop_of(t)->L, LUA_REGISTRYINDEX, t->ctx_ref);
  luaL_unref(loop_of(t)->L, LUA_REGISTRYINDEX, t->sni_ref);
  t->ctx_ref = t->sni_ref = LUA_NOREF;
  if (t->hs_timer != NULL) {
    uv_close((uv_handle_t *)t->hs_timer, hs_timer_free);
    t->hs_timer = NULL;
  }
  settle_handshake(t);
  if (t->wait_timer != NULL) {
    uv_close((uv_handle_t *)t->wait_timer, hs_timer_free);
    t->wait_timer = NULL;
  }
}

static void tls_free(lua_State *L, void *layer) {
  ts_tls *t = layer;

  free_ssl(t);
  luaL_unref(L, LUA_REGISTRYINDEX, t->ctx_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, t->sni_ref);
  free(t);
}

static const ts_layer_ops tls_ops = {
    tls_on_read, tls_on_eof,   tls_on_error, tls_pump,   tls_encode,
    tls_output,  tls_shutdown, tls_error,    tls_closed, tls_free,
};

/* ---- contexts ---- */

static ts_ctx *check_ctx(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, TS_CTX_MT);
}

static int ctx_gc(lua_State *L) {
  ts_ctx *c = check_ctx(L, 1);
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
  ssl_reason(reason, sizeof(reason));
  return luaL_error(L, fmt, arg, reason);
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
static void load_default_paths(ts_ctx *c) {
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
    load_default_paths(sub);
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
  c->default_paths = cafile == NULL && capath == NULL; /* load_default_paths */
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

static int l_tls_live(lua_State *L) {
  lua_pushinteger(L, live_ssl);
  return 1;
}

static int ctx_has_certificate(lua_State *L) {
  lua_pushboolean(L, check_ctx(L, 1)->has_cert);
  return 1;
}

static int ctx_tostring(lua_State *L) {
  lua_pushfstring(L, "tcpserver.ssl_context (%p)", (void *)check_ctx(L, 1));
  return 1;
}

/* ---- attaching to a stream ---- */

static int is_ip(const char *host) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

static void set_peer_name(ts_tls *t, const char *host, int verify) {
  if (host == NULL)
    return;
  if (!is_ip(host))
    SSL_set_tlsext_host_name(t->ssl, host);
  if (!(verify & SSL_VERIFY_PEER))
    return;
  if (is_ip(host))
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host);
  else
    SSL_set1_host(t->ssl, host);
}

/* Without verify, a side checks no certificate: a server by default. */
static int verify_mode(ts_ctx *c, int server) {
  return c->verify >= 0 ? c->verify : server ? SSL_VERIFY_NONE : SSL_VERIFY_PEER;
}

static ts_tls *new_tls(ts_ctx *c, int server, int verify) {
  ts_tls *t = calloc(1, sizeof(*t));

  if (t == NULL || (t->ssl = SSL_new(c->ctx)) == NULL)
    goto fail;
  live_ssl++;
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (t->rbio == NULL || t->wbio == NULL) {
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    goto fail;
  }
  BIO_set_mem_eof_return(t->rbio, -1); /* empty means "want more" */
  SSL_set_bio(t->ssl, t->rbio, t->wbio);
  SSL_set_verify(t->ssl, verify, NULL);
  SSL_set_app_data(t->ssl, t);
  t->server = server;
  t->ctx_ref = t->sni_ref = LUA_NOREF;
  ts_waiter_init(&t->hs);
  return t;
fail:
  if (t != NULL)
    free_ssl(t);
  free(t);
  return NULL;
}

int ts__tls_attach(lua_State *L, ts_stream *s, int ctx_idx, int server, const char *host,
                   double timeout) {
  ts_ctx *c = check_ctx(L, ctx_idx);
  int verify = verify_mode(c, server);
  ts_tls *t;

  if (verify & SSL_VERIFY_PEER)
    load_default_paths(c);
  t = new_tls(c, server, verify);

  if (t == NULL)
    return UV_ENOMEM;
  t->s = s;
  if (server) {
    snprintf(t->peer, sizeof(t->peer), "%s", host ? host : "?");
    SSL_set_accept_state(t->ssl);
  } else {
    SSL_set_connect_state(t->ssl);
    set_peer_name(t, host, verify);
  }
  lua_pushvalue(L, ctx_idx);
  t->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  ts__stream_attach(s, &tls_ops, t);
  if (ts__timeout_ms(timeout) > 0 &&
      (t->hs_timer = malloc(sizeof(*t->hs_timer))) != NULL) {
    uv_timer_init(loop_of(t)->uv, t->hs_timer);
    t->hs_timer->data = t;
    uv_timer_start(t->hs_timer, hs_timeout, ts__timeout_ms(timeout), 0);
  }
  if (!server) {
    handshake(t);
    ts__stream_flush(s);
  }
  return 0;
}

void ts__tls_feed(ts_stream *s, const char *data, size_t n) {
  tls_on_read(s, ts__stream_layer(s, &tls_ops), data, n);
}

/* ---- stream methods ---- */

/* The stream at 1 and its TLS layer (NULL on a plain stream). */
static ts_tls *check_tls(lua_State *L, ts_stream **s) {
  *s = ts__check_stream(L, 1);
  return ts__stream_layer(*s, &tls_ops);
}

static int l_wait_for_handshake(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);

  if (t != NULL && t->failed) {
    lua_pushnil(L);
    lua_pushstring(L, t->err);
    return 2;
  }
  if (t == NULL || t->done) { /* done: even if the peer has closed since */
    if (t == NULL && ts__stream_closed(s)) {
      lua_pushnil(L);
      lua_pushstring(L, ts__stream_error(s));
      return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
  }
  if (ts__stream_closed(s)) {
    lua_pushnil(L);
    lua_pushstring(L, ts__stream_error(s));
    return 2;
  }
  if (ts_waiter_waiting(&t->hs))
    return luaL_error(L, "wait_for_handshake: already waiting");
  ts__check_task(L, "wait_for_handshake");
  start_wait_timer(t);
  return ts_waiter_park(&t->hs, L);
}

/* "host:port" of the peer (pushed on L), or NULL. */
static const char *peer_name(lua_State *L, ts_stream *s) {
  uv_stream_t *h = ts__stream_handle(s);
  struct sockaddr_storage ss;
  char host[INET6_ADDRSTRLEN];
  int len = sizeof(ss), port;

  if (h->type != UV_TCP ||
      uv_tcp_getpeername((uv_tcp_t *)h, (struct sockaddr *)&ss, &len) != 0)
    return NULL;
  port = ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
  return lua_pushfstring(L, ss.ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d", host, port);
}

/* A DNS name: labels of 1-63 letters, digits, '-' (not first or last)
 * or '_', at most 253 bytes in all; one trailing dot (a fully qualified
 * name) is allowed. */
static int is_dns_name(const char *p, size_t len) {
  size_t i, label = 0;

  if (len > 0 && p[len - 1] == '.')
    len--;
  if (len == 0 || len > 253)
    return 0;
  for (i = 0; i <= len; i++) {
    unsigned char ch = i < len ? (unsigned char)p[i] : '.';
    if (ch == '.') {
      if (label == 0 || p[i - 1] == '-')
        return 0;
      label = 0;
    } else if (!(isalnum(ch) || ch == '_' || (ch == '-' && label > 0)) || ++label > 63) {
      return 0;
    }
  }
  return 1;
}

/* The name a client checks the server's certificate against, as Python's
 * ssl refuses it: OpenSSL takes "" as no check at all and ".x" as any
 * name under x, and C would cut a name at a NUL that Lua kept. Copies it
 * to out without a trailing dot (SNI carries none). */
static const char *check_server_name(lua_State *L, int idx, const char *what, char *out,
                                     size_t size) {
  size_t len;
  const char *p = lua_tolstring(L, idx, &len);

  if (p == NULL)
    return NULL;
  if (len == 0)
    luaL_error(L, "%s: server_hostname must not be empty", what);
  if (strlen(p) != len)
    luaL_error(L, "%s: server_hostname contains a NUL byte", what);
  if (p[0] == '.')
    luaL_error(L, "%s: server_hostname '%s' starts with a dot", what, p);
  if (!is_ip(p) && !is_dns_name(p, len))
    luaL_error(L, "%s: server_hostname '%s' is neither a DNS name nor an IP address",
               what, p);
  if (len >= size)
    luaL_error(L, "%s: server_hostname '%s' is too long", what, p);
  memcpy(out, p, len + 1);
  if (out[len - 1] == '.' && !is_ip(p))
    out[len - 1] = '\0';
  return out;
}

/* core.check_server_name(name, what) -> the name as it will be used, or
 * raises (tcpclient checks before it connects). */
static int l_check_server_name(lua_State *L) {
  char name[256];
  luaL_checkstring(L, 1);
  lua_pushstring(L, check_server_name(L, 1, luaL_checkstring(L, 2), name, sizeof(name)));
  return 1;
}

/* _start_tls(server_side, ctx, hostname, timeout): the Lua wrapper checks
 * the arguments and waits for the handshake. */
static int l_start_tls(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  int server = lua_toboolean(L, 2);
  const char *host = luaL_optstring(L, 4, NULL), *busy;
  double timeout = luaL_optnumber(L, 5, 0);
  char name[256];

  if (!server)
    host = check_server_name(L, 4, "start_tls", name, sizeof(name));

  /* A verified certificate proves nothing without a name to match. */
  if (!server && host == NULL && (verify_mode(check_ctx(L, 3), 0) & SSL_VERIFY_PEER))
    return luaL_error(L, "start_tls: a client needs server_hostname to check the "
                         "certificate against (or verify = \"none\")");
  if (t != NULL)
    return luaL_error(L, "start_tls: the stream already uses TLS");
  if (ts__stream_closed(s)) {
    lua_pushnil(L);
    lua_pushstring(L, ts__stream_error(s));
    return 2;
  }
  if ((busy = ts__stream_busy(s)) != NULL)
    return luaL_error(L, "start_tls: %s", busy);
  if (server && host == NULL) /* the peer, for the logs */
    host = peer_name(L, s);
  if (ts__tls_attach(L, s, 3, server, host, timeout) != 0)
    return luaL_error(L, "start_tls: out of memory");
  lua_pushboolean(L, 1);
  return 1;
}

static int push_x509_name(lua_State *L, X509_NAME *name) {
  BIO *b = BIO_new(BIO_s_mem());
  char *p;
  long n;

  X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253);
  n = BIO_get_mem_data(b, &p);
  lua_pushlstring(L, p, (size_t)n);
  BIO_free(b);
  return 1;
}

static void push_time(lua_State *L, const ASN1_TIME *at) {
  struct tm tm;
  if (ASN1_TIME_to_tm(at, &tm) == 1)
    lua_pushinteger(L, (lua_Integer)timegm(&tm));
  else
    lua_pushnil(L);
}

static int l_peer_certificate(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  X509 *x;
  BIO *b;
  char *p;
  long n;
  BIGNUM *bn;
  char *hex;

  if (t == NULL || t->ssl == NULL || (x = SSL_get1_peer_certificate(t->ssl)) == NULL)
    return 0;
  lua_createtable(L, 0, 7);
  push_x509_name(L, X509_get_subject_name(x));
  lua_setfield(L, -2, "subject");
  push_x509_name(L, X509_get_issuer_name(x));
  lua_setfield(L, -2, "issuer");
  bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(x), NULL);
  hex = bn ? BN_bn2hex(bn) : NULL;
  lua_pushstring(L, hex ? hex : "");
  lua_setfield(L, -2, "serial");
  OPENSSL_free(hex);
  BN_free(bn);
  push_time(L, X509_get0_notBefore(x));
  lua_setfield(L, -2, "not_before");
  push_time(L, X509_get0_notAfter(x));
  lua_setfield(L, -2, "not_after");
  b = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(b, x);
  n = BIO_get_mem_data(b, &p);
  lua_pushlstring(L, p, (size_t)n);
  lua_setfield(L, -2, "pem");
  BIO_free(b);
  lua_pushboolean(L, SSL_get_verify_result(t->ssl) == X509_V_OK &&
                         (SSL_get_verify_mode(t->ssl) & SSL_VERIFY_PEER));
  lua_setfield(L, -2, "verified");
  X509_free(x);
  return 1;
}

static int l_alpn_protocol(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  const unsigned char *p = NULL;
  unsigned n = 0;

  if (t != NULL && t->ssl != NULL)
    SSL_get0_alpn_selected(t->ssl, &p, &n);
  if (n == 0)
    return 0;
  lua_pushlstring(L, (const char *)p, n);
  return 1;
}

static int l_tls_version(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  if (t == NULL || !t->done || t->ssl == NULL)
    return 0;
  lua_pushstring(L, SSL_get_version(t->ssl));
  return 1;
}

/* server_name() -> the name the client asked for with SNI (a client: the
 * name it sent), or nil */
static int l_server_name(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  const char *name;

  if (t == NULL || t->ssl == NULL ||
      (name = SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name)) == NULL)
    return 0;
  lua_pushstring(L, name);
  return 1;
}

static int l_cipher(lua_State *L) {
  ts_stream *s;
  ts_tls *t = check_tls(L, &s);
  if (t == NULL || !t->done || t->ssl == NULL)
    return 0;
  lua_pushstring(L, SSL_get_cipher_name(t->ssl));
  return 1;
}

int ts__open_tls(lua_State *L) {
  static const luaL_Reg stream_methods[] = {{"wait_for_handshake", l_wait_for_handshake},
                                            {"_start_tls", l_start_tls},
                                            {"peer_certificate", l_peer_certificate},
                                            {"alpn_protocol", l_alpn_protocol},
                                            {"tls_version", l_tls_version},
                                            {"cipher", l_cipher},
                                            {"server_name", l_server_name},
                                            {NULL, NULL}};
  static const luaL_Reg ctx_methods[] = {{"has_certificate", ctx_has_certificate},
                                         {NULL, NULL}};
  static const luaL_Reg ctx_meta[] = {
      {"__gc", ctx_gc}, {"__tostring", ctx_tostring}, {"__index", NULL}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"ssl_context", l_ssl_context},
                                   {"tls_live", l_tls_live},
                                   {"check_server_name", l_check_server_name},
                                   {NULL, NULL}};

  luaL_newmetatable(L, TS_CTX_MT);
  luaL_setfuncs(L, ctx_meta, 0);
  luaL_newlib(L, ctx_methods);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "ssl_context_mt"); /* exported for ssl.lua */
  lua_getfield(L, -1, "stream_mt");      /* ts__open_stream ran first */
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, stream_methods, 0);
  lua_pop(L, 2);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
