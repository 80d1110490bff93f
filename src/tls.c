/* TLS as a stream layer: OpenSSL over memory BIOs. Ciphertext read from
 * the socket is fed to the SSL object and the plaintext goes to the
 * stream's read buffer; what write() queued is encrypted when the stream
 * flushes, and the ciphertext leaves through the stream's write path. */
#define _DEFAULT_SOURCE /* timegm */
#include "tls_int.h"

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

/* ---- errors ---- */

const char *ts__tls_reason(char *buf, size_t len) {
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
  if (t->server && !t->done && ts__stream_tally(t->s) != NULL)
    ts__stream_tally(t->s)->layer_failures++;
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
    default: tls_fail(t, ts__tls_reason(reason, sizeof(reason))); return;
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
    ts__tls_reason(reason, sizeof(reason));
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

/* Whether OpenSSL holds bytes not decoded yet: held back at the read
 * high-water mark, or once a read request was answered. */
static int holding(ts_tls *t) {
  return t->ssl != NULL && (SSL_pending(t->ssl) > 0 || BIO_ctrl_pending(t->rbio) > 0);
}

/* The end reaches the stream once nothing is held back: the peer's
 * close_notify, or its EOF, which may come before the held records are
 * read (pump delivers it then). */
static void deliver_end(ts_stream *s, ts_tls *t) {
  if (t->end_delivered || !(t->close_notify || (t->peer_eof && !holding(t))))
    return;
  t->end_delivered = 1;
  ts__stream_on_eof(s);
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
    deliver_end(s, t);
  else
    ts__stream_on_data(s);
  if (t->done != was_done || t->failed)
    settle_handshake(t);
}

static void tls_on_eof(ts_stream *s, void *layer) {
  ts_tls *t = layer;

  if (t->done) { /* EOF without close_notify: the end of data all the same */
    t->peer_eof = 1;
    if (!t->failed)
      read_plain(t);
    if (t->close_notify || !holding(t))
      deliver_end(s, t);
    else
      ts__stream_on_data(s);
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

  if (t->done && !t->failed && holding(t))
    read_plain(t);
  if (t->done && !t->failed)
    deliver_end(s, t); /* what came after the held records */
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

/* set_timeout's limit, or task L's deadline (with_timeout) if sooner;
 * -1 if that has passed. */
static int start_wait_timer(ts_tls *t, lua_State *L) {
  uint64_t ms = ts__timeout_ms(ts__stream_timeout(t->s));

  if (ts__wait_limit(L, &ms) < 0)
    return -1;
  if (ms == 0)
    return 0;
  if (t->wait_timer == NULL) {
    if ((t->wait_timer = malloc(sizeof(*t->wait_timer))) == NULL)
      return 0; /* no limit then, rather than no wait */
    uv_timer_init(loop_of(t)->uv, t->wait_timer);
    t->wait_timer->data = t;
  }
  uv_timer_start(t->wait_timer, hs_wait_timeout, ms, 0);
  return 0;
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

  /* Timers still here were never closed: the stream was open at
   * lua_close, and the loop runs no more (as the stream's wait timer). */
  free(t->hs_timer);
  free(t->wait_timer);
  free_ssl(t);
  luaL_unref(L, LUA_REGISTRYINDEX, t->ctx_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, t->sni_ref);
  free(t);
}

static void tls_forget(ts_stream *s, void *layer, lua_State *co) {
  ts_tls *t = layer;

  (void)s;
  if (t->hs.co != co)
    return;
  if (t->wait_timer != NULL)
    uv_timer_stop(t->wait_timer);
  luaL_unref(loop_of(t)->L, LUA_REGISTRYINDEX, t->hs.ref);
  ts_waiter_init(&t->hs);
}

static const ts_layer_ops tls_ops = {
    .on_read = tls_on_read,
    .on_eof = tls_on_eof,
    .on_error = tls_on_error,
    .pump = tls_pump,
    .encode = tls_encode,
    .output = tls_output,
    .shutdown = tls_shutdown,
    .error = tls_error,
    .closed = tls_closed,
    .free = tls_free,
    .forget = tls_forget,
};

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
  ts_ctx *c = ts__tls_check_ctx(L, ctx_idx);
  int verify = ts__tls_verify_mode(c, server);
  ts_tls *t;

  if (verify & SSL_VERIFY_PEER)
    ts__tls_load_default_paths(c);
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
  if (start_wait_timer(t, L) < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
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
  if (!server && host == NULL &&
      (ts__tls_verify_mode(ts__tls_check_ctx(L, 3), 0) & SSL_VERIFY_PEER))
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

static int l_tls_live(lua_State *L) {
  lua_pushinteger(L, live_ssl);
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
  static const luaL_Reg funcs[] = {
      {"tls_live", l_tls_live}, {"check_server_name", l_check_server_name}, {NULL, NULL}};

  ts__tls_open_ctx(L);
  ts__stream_methods(L, stream_methods);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
