/* PROXY protocol v1 and v2 (HAProxy's): the header a load balancer sends
 * before the client's bytes, parsed in C before handle_stream runs, so that
 * `address` is the original client's. */
#include "stream.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define V1_MAX 107                 /* the spec's longest v1 line */
#define V2_MAX_BODY 1024           /* addresses plus a sensible amount of TLVs */

static const char v2_sig[12] = "\r\n\r\n\0\r\nQUIT\n";

typedef struct proxy_addr {
  char host[INET6_ADDRSTRLEN];
  int port;
  const char *family;   /* NULL: keep the connection's own address */
} proxy_addr;

struct ts_proxy {
  int handler_ref, ctx_ref;
  double handshake_timeout;
};

/* Parses a v1 line. Returns its length, 0 for more, or -1 (sets *why). */
static long parse_v1(const char *p, size_t n, proxy_addr *a, const char **why) {
  char line[V1_MAX + 1], proto[8], src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
  const char *end = memchr(p, '\n', n < V1_MAX ? n : V1_MAX);
  unsigned sport, dport;
  unsigned char tmp[16];
  size_t len;

  if (end == NULL) {
    *why = "header line too long";
    return n >= V1_MAX ? -1 : 0;
  }
  len = (size_t)(end - p) + 1;
  *why = "malformed v1 header";
  if (len < 8 || p[len - 2] != '\r')
    return -1;
  memcpy(line, p, len - 2);
  line[len - 2] = '\0';
  if (strncmp(line, "PROXY UNKNOWN", 13) == 0) {
    a->family = NULL;
    return (long)len;
  }
  if (sscanf(line, "PROXY %7s %45s %45s %u %u", proto, src, dst, &sport, &dport) != 5 ||
      sport > 65535 || dport > 65535)
    return -1;
  if (strcmp(proto, "TCP4") == 0 && inet_pton(AF_INET, src, tmp) == 1)
    a->family = "inet";
  else if (strcmp(proto, "TCP6") == 0 && inet_pton(AF_INET6, src, tmp) == 1)
    a->family = "inet6";
  else
    return -1;
  snprintf(a->host, sizeof(a->host), "%s", src);
  a->port = (int)sport;
  return (long)len;
}

/* Parses a v2 header. Same returns as parse_v1. */
static long parse_v2(const unsigned char *p, size_t n, proxy_addr *a,
                     const char **why) {
  size_t body;

  if (n < 16)
    return 0;
  body = (size_t)p[14] << 8 | p[15];
  *why = "header too large";
  if (body > V2_MAX_BODY)
    return -1;
  *why = "malformed v2 header";
  if ((p[12] >> 4) != 2 || (p[12] & 15) > 1)
    return -1;
  if (n < 16 + body)
    return 0;
  a->family = NULL;
  if ((p[12] & 15) == 0) /* LOCAL: a health check from the balancer */
    return (long)(16 + body);
  switch (p[13] >> 4) {
  case 1:
    if (body < 12)
      return -1;
    inet_ntop(AF_INET, p + 16, a->host, sizeof(a->host));
    a->port = p[24] << 8 | p[25];
    a->family = "inet";
    break;
  case 2:
    if (body < 36)
      return -1;
    inet_ntop(AF_INET6, p + 16, a->host, sizeof(a->host));
    a->port = p[48] << 8 | p[49];
    a->family = "inet6";
    break;
  }
  return (long)(16 + body);
}

static long parse(const char *p, size_t n, proxy_addr *a, const char **why) {
  size_t k = n < 12 ? n : 12;

  *why = "no PROXY header";
  if (n == 0)
    return 0;
  if (memcmp(p, "PROXY ", n < 6 ? n : 6) == 0)
    return n < 6 ? 0 : parse_v1(p, n, a, why);
  if (memcmp(p, v2_sig, k) == 0)
    return parse_v2((const unsigned char *)p, n, a, why);
  return -1;
}

static void log_refusal(ts_stream *s, const char *why) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  char host[INET6_ADDRSTRLEN] = "?", msg[200];

  if (!(s->flags & F_PIPE) &&
      uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
    ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
  }
  snprintf(msg, sizeof(msg), "PROXY protocol: %s from %s; closing", why, host);
  ts__log(s->h.handle.loop->data, "info", msg);
}

static void refuse(ts_stream *s, const char *why) {
  lua_State *L = ((ts_loop *)s->h.handle.loop->data)->L;
  ts_proxy *p = s->proxy;

  if (why != NULL)
    log_refusal(s, why);
  s->proxy = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, p->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->ctx_ref);
  free(p);
  ts__stream_unborrow(s);
  ts__stream_close(s, UV_ECONNABORTED);
}

/* TLS behind the header: what came after it is ciphertext. */
static int start_tls(lua_State *L, ts_stream *s, int ctx_ref, const char *host,
                     int port, double timeout) {
  const char *peer = lua_pushfstring(L, "%s:%d", host, port);
  size_t n = ts_buf_len(&s->rbuf);
  char *early = NULL;
  int err;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
  err = ts__tls_attach(L, s, lua_gettop(L), 1, peer, timeout);
  lua_pop(L, 2);
  if (err != 0 || n == 0)
    return err;
  early = malloc(n);
  if (early == NULL)
    return UV_ENOMEM;
  memcpy(early, ts_buf_head(&s->rbuf), n);
  ts_buf_consume(&s->rbuf, n);
  ts__tls_on_read(s, early, n);
  free(early);
  return 0;
}

/* Serves the stream now that its peer is known. */
static void finish(ts_stream *s, const proxy_addr *a) {
  lua_State *L = ((ts_loop *)s->h.handle.loop->data)->L;
  ts_proxy *p = s->proxy;
  struct sockaddr_storage ss;
  int len = sizeof(ss), err = 0, port = 0;
  char host[INET6_ADDRSTRLEN] = "";
  const char *family = (s->flags & F_PIPE) ? "unix" : "inet";

  s->proxy = NULL;
  ts__stream_unborrow(s);
  if (s->timer != NULL)
    uv_timer_stop(s->timer);
  if (a->family != NULL) {
    snprintf(host, sizeof(host), "%s", a->host);
    port = a->port;
    family = a->family;
  } else if (!(s->flags & F_PIPE) &&
             uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
    port = ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
    family = ss.ss_family == AF_INET6 ? "inet6" : "inet";
  }
  if (p->ctx_ref != LUA_NOREF)
    err = start_tls(L, s, p->ctx_ref, host, port, p->handshake_timeout);
  if (err == 0)
    ts__serve(L, s, p->handler_ref, host, port, family);
  else
    ts__stream_close(s, err);
  luaL_unref(L, LUA_REGISTRYINDEX, p->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, p->ctx_ref);
  free(p);
}

void ts__proxy_on_data(ts_stream *s) {
  proxy_addr a;
  const char *why = NULL;
  long n = parse(ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf), &a, &why);

  if (n < 0) {
    refuse(s, why);
  } else if (n == 0) {
    ts__stream_unborrow(s); /* keep the partial header */
  } else {
    ts_buf_consume(&s->rbuf, (size_t)n);
    finish(s, &a);
  }
}

void ts__proxy_on_eof(ts_stream *s) {
  if (ts_buf_len(&s->rbuf) == 0) { /* a probe: closes silently */
    refuse(s, NULL);
    return;
  }
  refuse(s, "connection closed inside the header");
}

void ts__proxy_timeout(ts_stream *s) {
  refuse(s, "header timed out");
}

/* Waits for the header before the server's handler runs. */
int ts__proxy_begin(lua_State *L, ts_stream *s, int handler_ref, int ctx_ref,
                    double timeout) {
  ts_proxy *p = malloc(sizeof(*p));

  if (p == NULL)
    return UV_ENOMEM;
  lua_rawgeti(L, LUA_REGISTRYINDEX, handler_ref);
  p->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (ctx_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
    p->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  } else {
    p->ctx_ref = LUA_NOREF;
  }
  p->handshake_timeout = timeout;
  s->proxy = p;
  if (ts__timeout_ms(timeout) > 0)
    ts__stream_start_timer(s, ts__timeout_ms(timeout));
  return 0;
}
