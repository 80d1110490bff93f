/* Outgoing connections: resolve through libuv, try each address in turn,
 * all under one deadline that also closes the attempt in progress. */
#include "client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

typedef struct connect_req {
  uv_getaddrinfo_t gai;
  uv_connect_t conn;
  uv_timer_t timer;
  struct addrinfo *res, *cur;
  struct sockaddr_storage source;
  ts_waiter w;  /* the task in connect */
  ts_stream *s; /* the attempt in progress */
  int has_source, done, refs;
  char host[256];
} connect_req;

static void release(connect_req *r) {
  if (--r->refs > 0)
    return;
  if (r->res != NULL)
    uv_freeaddrinfo(r->res);
  free(r);
}

static void timer_closed(uv_handle_t *h) {
  release(h->data);
}

/* Resumes the waiting task with what is on its stack (nres values). */
static void finish_connect(connect_req *r, int nres) {
  r->done = 1;
  uv_close((uv_handle_t *)&r->timer, timer_closed);
  ts_waiter_wake(&r->w, nres);
}

static void finish_error(connect_req *r, const char *err) {
  r->done = 1;
  uv_close((uv_handle_t *)&r->timer, timer_closed);
  ts_waiter_wake_error(&r->w, err);
}

static void try_next(connect_req *r, int last_err);

/* The attempt's connect_cb: returns 1 once the task has its stream (or
 * the request timed out), else the (negative) error of this attempt, whose
 * stream is aborted. */
static int attempt_done(connect_req *r, int status) {
  ts_stream *s = r->s;

  r->s = NULL;
  if (r->done) { /* timed out: the stream was aborted */
    release(r);
    return 1;
  }
  if (ts__task_killed(r->w.co)) { /* nobody to take the stream */
    ts__stream_abort(s);
    release(r);
    finish_error(r, "killed");
    return 1;
  }
  if (status == 0) {
    ts__stream_push(r->w.co, s);
    if (ts__stream_start(s) == 0) {
      release(r);
      finish_connect(r, 1);
      return 1;
    }
    lua_pop(r->w.co, 1);
    status = UV_ECONNRESET;
  }
  ts__stream_abort(s);
  return status;
}

static void connect_cb(uv_connect_t *req, int status) {
  connect_req *r = req->data;

  if ((status = attempt_done(r, status)) == 1)
    return;
  r->cur = r->cur->ai_next;
  release(r);
  try_next(r, status);
}

static int start_attempt(connect_req *r) {
  lua_State *L = r->w.co;
  ts_stream *s = ts__stream_new(L, 0);
  uv_tcp_t *tcp = (uv_tcp_t *)ts__stream_handle(s);
  int err = 0;

  lua_pop(L, 1); /* pinned by the stream itself until closed */
  if (r->has_source)
    err = uv_tcp_bind(tcp, (struct sockaddr *)&r->source, 0);
  if (err == 0)
    err = uv_tcp_connect(&r->conn, tcp, r->cur->ai_addr, connect_cb);
  if (err != 0) {
    ts__stream_abort(s);
    return err;
  }
  uv_tcp_nodelay(tcp, 1);
  r->s = s;
  r->refs++;
  return 0;
}

static void try_next(connect_req *r, int last_err) {
  int err;

  for (; r->cur != NULL; r->cur = r->cur->ai_next) {
    if (r->cur->ai_family != AF_INET && r->cur->ai_family != AF_INET6)
      continue;
    if (r->has_source && r->cur->ai_family != r->source.ss_family)
      continue;
    err = start_attempt(r);
    if (err == 0)
      return;
    last_err = err;
  }
  finish_error(r, ts__errname(last_err));
}

static void resolved_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  connect_req *r = req->data;
  char msg[320];

  r->res = res;
  if (!r->done && status != 0) {
    snprintf(msg, sizeof(msg), "cannot resolve %s: %s", r->host, uv_strerror(status));
    finish_error(r, msg);
  } else if (!r->done) {
    r->cur = res;
    try_next(r, UV_EADDRNOTAVAIL);
  }
  release(r);
}

static void timeout_cb(uv_timer_t *t) {
  connect_req *r = t->data;
  if (r->s != NULL)
    ts__stream_abort(r->s); /* its connect_cb sees ECANCELED */
  uv_cancel((uv_req_t *)&r->gai);
  finish_error(r, "timeout");
}

static int parse_source(lua_State *L, connect_req *r, const char *ip) {
  if (uv_ip4_addr(ip, 0, (struct sockaddr_in *)&r->source) == 0 ||
      uv_ip6_addr(ip, 0, (struct sockaddr_in6 *)&r->source) == 0) {
    r->has_source = 1;
    return 0;
  }
  free(r);
  return luaL_error(L, "connect: source_ip %s is not an IP address", ip);
}

static int push_nil_err(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static int timed_out(lua_State *L) {
  return push_nil_err(L, "timeout");
}

/* core.connect(host, port [, timeout [, source_ip]]) -> stream | nil, err */
static int l_connect(lua_State *L) {
  size_t hlen;
  const char *host = luaL_checklstring(L, 1, &hlen);
  lua_Integer port = luaL_checkinteger(L, 2);
  uint64_t ms = ts__timeout_ms(luaL_optnumber(L, 3, 0));
  const char *source = luaL_optstring(L, 4, NULL);
  ts_loop *loop = ts__loop(L);
  struct addrinfo hints;
  char service[16];
  connect_req *r;
  int err;

  luaL_argcheck(L, hlen > 0 && hlen < sizeof(r->host), 1, "bad host name");
  luaL_argcheck(L, strlen(host) == hlen, 1, "host contains a NUL byte");
  luaL_argcheck(L, port > 0 && port <= 65535, 2, "port out of range");
  ts__check_task(L, "connect");
  if (ts__wait_limit(L, &ms) < 0) /* with_timeout's deadline passed */
    return timed_out(L);
  r = calloc(1, sizeof(*r));
  if (r == NULL)
    return luaL_error(L, "connect: out of memory");
  if (source != NULL)
    parse_source(L, r, source);
  memcpy(r->host, host, hlen + 1);
  r->gai.data = r->conn.data = r->timer.data = r;
  memset(&hints, 0, sizeof(hints));
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  snprintf(service, sizeof(service), "%d", (int)port);
  err = uv_getaddrinfo(loop->uv, &r->gai, resolved_cb, host, service, &hints);
  if (err != 0) {
    free(r);
    lua_pushnil(L);
    lua_pushfstring(L, "cannot resolve %s: %s", host, uv_strerror(err));
    return 2;
  }
  r->refs = 2; /* the resolver and the timer */
  uv_timer_init(loop->uv, &r->timer);
  if (ms > 0)
    uv_timer_start(&r->timer, timeout_cb, ms, 0);
  ts_waiter_init(&r->w);
  return ts_waiter_park(&r->w, L);
}

/* ---- unix sockets ---- */

static void pipe_connect_cb(uv_connect_t *req, int status) {
  connect_req *r = req->data;

  if ((status = attempt_done(r, status)) == 1)
    return;
  release(r);
  finish_error(r, ts__errname(status));
}

/* core.connect_unix(path [, timeout]) -> stream | nil, err */
static int l_connect_unix(lua_State *L) {
  size_t plen;
  const char *path = luaL_checklstring(L, 1, &plen);
  uint64_t ms = ts__timeout_ms(luaL_optnumber(L, 2, 0));
  ts_loop *loop = ts__loop(L);
  connect_req *r;
  ts_stream *s;

  luaL_argcheck(L,
                plen > 0 && plen < sizeof(((struct sockaddr_un *)0)->sun_path) &&
                    strlen(path) == plen,
                1, "path empty, too long or with a NUL inside");
  ts__check_task(L, "connect");
  if (ts__wait_limit(L, &ms) < 0)
    return timed_out(L);
  r = calloc(1, sizeof(*r));
  if (r == NULL)
    return luaL_error(L, "connect: out of memory");
  s = ts__stream_new(L, 1);
  lua_pop(L, 1); /* pinned by the stream itself until closed */
  r->conn.data = r->timer.data = r;
  r->s = s;
  r->refs = 2; /* the connect request and the timer */
  uv_pipe_connect(&r->conn, (uv_pipe_t *)ts__stream_handle(s), path, pipe_connect_cb);
  uv_timer_init(loop->uv, &r->timer);
  if (ms > 0)
    uv_timer_start(&r->timer, timeout_cb, ms, 0);
  ts_waiter_init(&r->w);
  return ts_waiter_park(&r->w, L);
}

/* ---- name resolution alone (tcpserver.socket's dns.toip) ---- */

typedef struct resolve_req {
  uv_getaddrinfo_t gai;
  ts_waiter w;
} resolve_req;

static void resolve_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  resolve_req *r = req->data;
  lua_State *co = r->w.co;
  struct addrinfo *a;
  char host[INET6_ADDRSTRLEN];
  int n = 0;

  if (status != 0) {
    ts_waiter_wake_error(&r->w, uv_strerror(status));
  } else {
    lua_newtable(co);
    for (a = res; a != NULL; a = a->ai_next) {
      if (a->ai_family != AF_INET && a->ai_family != AF_INET6)
        continue;
      ts__addr_name(a->ai_addr, host, sizeof(host));
      lua_pushstring(co, host);
      lua_rawseti(co, -2, ++n);
    }
    ts_waiter_wake(&r->w, 1);
  }
  uv_freeaddrinfo(res);
  free(r);
}

/* core.resolve(host) -> {address, ...} | nil, err (in a task) */
static int l_resolve(lua_State *L) {
  size_t len;
  const char *host = luaL_checklstring(L, 1, &len);
  struct addrinfo hints;
  resolve_req *r;
  int err;

  luaL_argcheck(L, len > 0 && strlen(host) == len, 1, "host empty or with a NUL inside");
  ts__check_task(L, "resolve");
  r = calloc(1, sizeof(*r));
  if (r == NULL)
    return luaL_error(L, "resolve: out of memory");
  memset(&hints, 0, sizeof(hints));
  hints.ai_socktype = SOCK_STREAM;
  r->gai.data = r;
  ts_waiter_init(&r->w);
  err = uv_getaddrinfo(ts__loop(L)->uv, &r->gai, resolve_cb, host, NULL, &hints);
  if (err != 0) {
    free(r);
    lua_pushnil(L);
    lua_pushstring(L, uv_strerror(err));
    return 2;
  }
  return ts_waiter_park(&r->w, L);
}

/* core.gethostname() -> the machine's host name */
static int l_gethostname(lua_State *L) {
  char name[256];
  size_t len = sizeof(name);

  if (uv_os_gethostname(name, &len) != 0)
    return push_nil_err(L, "cannot get the host name");
  lua_pushlstring(L, name, len);
  return 1;
}

/* core.gettime() -> seconds since the epoch, with a fraction */
static int l_gettime(lua_State *L) {
  uv_timeval64_t tv;

  if (uv_gettimeofday(&tv) != 0)
    return push_nil_err(L, "cannot read the clock");
  lua_pushnumber(L, (lua_Number)tv.tv_sec + (lua_Number)tv.tv_usec / 1e6);
  return 1;
}

int ts__open_client(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"connect", l_connect}, {"connect_unix", l_connect_unix},
      {"resolve", l_resolve}, {"gethostname", l_gethostname},
      {"gettime", l_gettime}, {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
