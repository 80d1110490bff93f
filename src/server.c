/* Listening sockets under a uv_poll: accept in batches, hand each stream to
 * a Lua function running in a new task, pause at max_connections and back
 * off when the process runs out of descriptors. */
#define _GNU_SOURCE
#include "stream.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64
#define BACKOFF_MS 100
#define FDS_LOG_MS 60000 /* at most one line a minute while it lasts */

typedef struct ts_listener {
  uv_poll_t poll;
  uv_timer_t backoff;    /* restarts accepting after EMFILE */
  int fd, family;
  int fn_ref, self_ref, sock_ref;
  int ctx_ref;           /* TLS context, or LUA_NOREF */
  int proxy_protocol;    /* a PROXY header comes first */
  double handshake_timeout;
  int polling, closed, paused, out_of_fds, pending_closes;
  uint64_t fds_logged;   /* when running out of fds was last logged (ms) */
  size_t max_buffer, chunk;
  double timeout;
} ts_listener;

static ts_listener *check_listener(lua_State *L) {
  return luaL_checkudata(L, 1, TS_LISTENER_MT);
}

static void accept_cb(uv_poll_t *h, int status, int events);

static void update_polling(ts_listener *ls) {
  int want = !ls->closed && !ls->paused && !ls->out_of_fds;
  if (want && !ls->polling)
    uv_poll_start(&ls->poll, UV_READABLE, accept_cb);
  else if (!want && ls->polling)
    uv_poll_stop(&ls->poll);
  ls->polling = want;
}

static void backoff_cb(uv_timer_t *t) {
  ts_listener *ls = t->data;
  ls->out_of_fds = 0;
  update_polling(ls);
}

/* Waits BACKOFF_MS before accepting again: a full descriptor table would
 * otherwise wake the loop for the same pending connection forever. */
static void out_of_fds(ts_listener *ls, int err) {
  uint64_t now = uv_now(ls->poll.loop);
  char msg[160];

  if (ls->fds_logged == 0 || now - ls->fds_logged >= FDS_LOG_MS) {
    snprintf(msg, sizeof(msg), "accept: %s; retrying every %d ms",
             strerror(err), BACKOFF_MS);
    ts__report(ls->poll.loop->data, msg);
    ls->fds_logged = now ? now : 1;
  }
  ls->out_of_fds = 1;
  update_polling(ls);
  uv_timer_start(&ls->backoff, backoff_cb, BACKOFF_MS, 0);
}

/* Wraps an accepted fd in a stream and runs the server's function on it. */
static void serve(ts_listener *ls, int fd, struct sockaddr_storage *ss) {
  ts_loop *loop = ls->poll.loop->data;
  lua_State *L = loop->L;
  int is_pipe = ls->family == AF_UNIX, err;
  ts_stream *s;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->fn_ref);
  s = ts__stream_new(L, is_pipe);
  err = is_pipe ? uv_pipe_open((uv_pipe_t *)ts__stream_handle(s), fd)
                : uv_tcp_open((uv_tcp_t *)ts__stream_handle(s), fd);
  if (err != 0) {
    close(fd);
    ts__stream_abort(s);
    lua_pop(L, 2);
    return;
  }
  ts__stream_configure(s, ls->max_buffer, ls->chunk, ls->timeout);
  if (ls->proxy_protocol) {
    lua_pop(L, 1); /* the stream pins itself */
    if (ts__proxy_begin(L, s, ls->ctx_ref, ls->handshake_timeout) != 0)
      ts__stream_abort(s);
    else
      ts__stream_start(s);
    return;
  }
  if (!is_pipe) {
    /* Writes are coalesced per wake-up, so Nagle only adds latency. */
    uv_tcp_nodelay((uv_tcp_t *)ts__stream_handle(s), 1);
    ts__push_addr(L, (struct sockaddr *)ss);
  } else {
    lua_pushliteral(L, "");
    lua_pushinteger(L, 0);
    lua_pushliteral(L, "unix");
  }
  if (ls->ctx_ref != LUA_NOREF) {
    /* The peer as accept saw it: a reset may leave getpeername nothing. */
    const char *peer = lua_pushfstring(
        L, ss->ss_family == AF_INET6 ? "[%s]:%d" : "%s:%d",
        lua_tostring(L, -3), (int)lua_tointeger(L, -2));
    lua_rawgeti(L, LUA_REGISTRYINDEX, ls->ctx_ref);
    err = ts__tls_attach(L, s, lua_gettop(L), 1, peer, ls->handshake_timeout);
    lua_pop(L, 2);
    if (err != 0) {
      ts__stream_abort(s);
      lua_pop(L, 5);
      return;
    }
  }
  ts__stream_start(s);
  ts__spawn(L, 4);
}

static void accept_cb(uv_poll_t *h, int status, int events) {
  ts_listener *ls = h->data;
  struct sockaddr_storage ss;
  socklen_t len;
  int i, fd;

  (void)events;
  if (status < 0)
    return;
  for (i = 0; i < ACCEPT_BATCH && ls->polling; i++) {
    len = sizeof(ss);
    fd = accept4(ls->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      serve(ls, fd, &ss);
      continue;
    }
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
      out_of_fds(ls, errno);
    if (errno != EINTR && errno != ECONNABORTED && errno != EPROTO)
      break;
  }
}

static void listener_closed(uv_handle_t *h) {
  ts_listener *ls = h->data;
  lua_State *L = ((ts_loop *)h->loop->data)->L;

  if (--ls->pending_closes > 0)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->sock_ref);
  ts__socket_release(L, -1);
  lua_pop(L, 1);
  close(ls->fd);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->sock_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->ctx_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->self_ref);
}

static int l_listener_close(lua_State *L) {
  ts_listener *ls = check_listener(L);
  if (ls->closed)
    return 0;
  ls->closed = 1;
  update_polling(ls);
  ls->pending_closes = 2;
  uv_close((uv_handle_t *)&ls->poll, listener_closed);
  uv_close((uv_handle_t *)&ls->backoff, listener_closed);
  return 0;
}

static int l_listener_pause(lua_State *L) {
  ts_listener *ls = check_listener(L);
  ls->paused = lua_isnone(L, 2) || lua_toboolean(L, 2);
  update_polling(ls);
  return 0;
}

static size_t opt_size(lua_State *L, int t, const char *k, size_t def) {
  lua_Integer v;
  lua_getfield(L, t, k);
  v = luaL_optinteger(L, -1, (lua_Integer)def);
  lua_pop(L, 1);
  if (v <= 0)
    luaL_error(L, "%s must be positive", k);
  return (size_t)v;
}

/* core.listener(socket, opts, fn): fn(stream, host, port, family) runs in a
 * new task for each connection. opts: max_buffer_size, read_chunk_size,
 * idle_timeout. */
static int l_listener(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  ts_listener *ls;
  int fd, family;

  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  ls = lua_newuserdatauv(L, sizeof(*ls), 0);
  memset(ls, 0, sizeof(*ls));
  ls->max_buffer = opt_size(L, 2, "max_buffer_size", 100 * 1024 * 1024);
  ls->chunk = opt_size(L, 2, "read_chunk_size", 64 * 1024);
  lua_getfield(L, 2, "idle_timeout");
  ls->timeout = luaL_optnumber(L, -1, 0);
  lua_getfield(L, 2, "proxy_protocol");
  ls->proxy_protocol = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 2, "handshake_timeout");
  ls->handshake_timeout = luaL_optnumber(L, -1, 10);
  if (lua_getfield(L, 2, "ssl_context") != LUA_TNIL)
    luaL_checkudata(L, -1, "tcpserver.ssl_context");
  ls->ctx_ref = lua_isnil(L, -1) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, ls->ctx_ref == LUA_NOREF ? 3 : 2);
  fd = ts__socket_take(L, 1, &family);
  luaL_setmetatable(L, TS_LISTENER_MT);
  ls->fd = fd;
  ls->family = family;
  uv_poll_init_socket(loop->uv, &ls->poll, fd);
  uv_timer_init(loop->uv, &ls->backoff);
  ls->poll.data = ls->backoff.data = ls;
  lua_pushvalue(L, 3);
  ls->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 1);
  ls->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  ls->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  update_polling(ls);
  return 1;
}

int ts__open_server(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"close", l_listener_close}, {"pause", l_listener_pause}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"listener", l_listener}, {NULL, NULL}};

  luaL_newmetatable(L, TS_LISTENER_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
