/* What tls.c (the layer) and tls_ctx.c (contexts) share. */
#ifndef TS_TLS_INT_H
#define TS_TLS_INT_H

#include "tls.h"

#include <arpa/inet.h>
#include <openssl/ssl.h>

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
  int peer_eof, end_delivered; /* the socket's EOF came; the stream was told the end */
  char peer[INET6_ADDRSTRLEN + 8]; /* server side: the client, for logs */
  size_t rx;                       /* ciphertext bytes received */
  ts_buf xbuf;                     /* ciphertext waiting to be written */
  char err[160];                   /* "tls: <reason>" once failed */
  char hello_name[256];            /* server side: the ClientHello's SNI, or "" */
} ts_tls;

static inline ts_loop *loop_of(ts_tls *t) {
  return ts__stream_loop(t->s);
}

/* tls.c: the newest OpenSSL error as a short reason, clearing the queue */
const char *ts__tls_reason(char *buf, size_t len);

/* tls_ctx.c */
ts_ctx *ts__tls_check_ctx(lua_State *L, int idx);
/* Without verify, a side checks no certificate: a server by default. */
int ts__tls_verify_mode(ts_ctx *c, int server);
void ts__tls_load_default_paths(ts_ctx *c); /* the system CAs, once */
void ts__tls_open_ctx(lua_State *L);        /* core.ssl_context and its metatable */

#endif
