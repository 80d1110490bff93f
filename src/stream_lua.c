/* The stream's Lua face: one method table, built here, that other files
 * add to through ts__stream_methods (tls.c adds the TLS methods), and the
 * methods that are not on the hot path. The read and write methods live
 * in stream_read.c and stream_write.c, beside the helpers they inline. */
#include "stream_int.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

/* Any stream argument, as check_self (stream_int.h) checks the methods'. */
ts_stream *ts__check_stream(lua_State *L, int idx) {
  ts_stream *s = lua_touserdata(L, idx);
  size_t size = s != NULL ? lua_rawlen(L, idx) : 0;

  if ((size != STREAM_SIZE(0) && size != STREAM_SIZE(1)) || s->h.handle.data != s)
    return luaL_checkudata(L, idx, TS_STREAM_MT);
  return s;
}

static int l_close(lua_State *L) {
  ts_stream *s = luaL_checkudata(L, 1, TS_STREAM_MT);
  if (!(s->flags & F_DONE) && s->self_ref != LUA_NOREF)
    ts__stream_close(s, 0);
  return 0;
}

static int l_closed(lua_State *L) {
  lua_pushboolean(L, (check_self(L)->flags & F_CLOSED) != 0);
  return 1;
}

static int l_set_close_callback(lua_State *L) {
  ts_stream *s = check_self(L);

  stream_rare *r;

  if (!lua_isnoneornil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  if (s->flags & F_DONE) { /* now; and the one close_cb has yet to run goes */
    if (s->rare != NULL) {
      luaL_unref(L, LUA_REGISTRYINDEX, s->rare->close_cb_ref);
      s->rare->close_cb_ref = LUA_NOREF;
    }
    if (!lua_isnil(L, 2))
      lua_call(L, 0, 0);
    return 0;
  }
  if ((r = ts__stream_rare(s)) == NULL)
    return luaL_error(L, "set_close_callback: out of memory");
  luaL_unref(L, LUA_REGISTRYINDEX, r->close_cb_ref);
  r->close_cb_ref = lua_isnil(L, 2) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
  ts__read_close_if_ended(s); /* the end came before the callback did */
  return 0;
}

/* ---- options and addresses ---- */

static int l_settimeout(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Number t = luaL_optnumber(L, 2, 0);
  luaL_argcheck(L, t >= 0, 2, "set_timeout: seconds must be 0 or more"); /* NaN is not */
  ts__stream_set_timeout(s, t);
  return 0;
}

/* settimeouts(connect, send, read): OpenResty's, in seconds (nil or 0:
 * none); connect is for tcpserver.socket (a stream is connected already). */
static int l_settimeouts(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Number send = luaL_optnumber(L, 3, 0), read = luaL_optnumber(L, 4, 0);

  luaL_optnumber(L, 2, 0);
  luaL_argcheck(L, send >= 0, 3, "settimeouts: seconds must be 0 or more");
  luaL_argcheck(L, read >= 0, 4, "settimeouts: seconds must be 0 or more");
  ts__stream_set_timeouts(s, read, send);
  return 0;
}

/* set_half_open([on]): the peer's end no longer closes the stream: a
 * read there gets nil, "closed" (read_until_close its data) and the
 * stream may still be written, until close() (a proxy passing a
 * half-close on: shutdown("send") the other way). */
static int l_set_half_open(lua_State *L) {
  ts_stream *s = check_self(L);

  if (lua_isnone(L, 2) || lua_toboolean(L, 2))
    s->flags |= F_HALF_OPEN;
  else
    s->flags &= ~F_HALF_OPEN;
  return 0;
}

static int l_set_nodelay(lua_State *L) {
  ts_stream *s = check_self(L);
  int on = lua_isnone(L, 2) || lua_toboolean(L, 2);
  if (!(s->flags & (F_PIPE | F_HCLOSING)))
    uv_tcp_nodelay(&s->h.tcp, on);
  return 0;
}

static int l_shutdown(lua_State *L) {
  ts_stream *s = check_self(L);
  return ts__stream_shutdown(L, s, luaL_optstring(L, 2, "both"));
}

/* The socket options of setoption/getoption (LuaSocket's names). */
static const char *const option_names[] = {"tcp-nodelay", "keepalive", "reuseaddr",
                                           "linger", NULL};
static const int option_levels[] = {IPPROTO_TCP, SOL_SOCKET, SOL_SOCKET, SOL_SOCKET};
static const int option_ids[] = {TCP_NODELAY, SO_KEEPALIVE, SO_REUSEADDR, SO_LINGER};

static int option_fd(lua_State *L, ts_stream *s, uv_os_fd_t *fd) {
  if (s->flags & F_HCLOSING)
    return push_error(L, "closed");
  if ((s->flags & F_PIPE) || uv_fileno(&s->h.handle, fd) != 0)
    return push_error(L, "not a TCP stream");
  return 0;
}

/* setoption(name, value) -> true | nil, err. "linger" takes {on =,
 * timeout = seconds}, the others a boolean. */
static int l_setoption(lua_State *L) {
  ts_stream *s = check_self(L);
  int i = luaL_checkoption(L, 2, NULL, option_names), on, n;
  struct linger lg;
  uv_os_fd_t fd;

  if ((n = option_fd(L, s, &fd)) != 0)
    return n;
  if (option_ids[i] == SO_LINGER) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "on");
    lua_getfield(L, 3, "timeout");
    lg.l_onoff = lua_toboolean(L, -2);
    lg.l_linger = (int)luaL_optinteger(L, -1, 0);
    n = setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  } else {
    luaL_checkany(L, 3);
    on = lua_toboolean(L, 3);
    n = setsockopt(fd, option_levels[i], option_ids[i], &on, sizeof(on));
  }
  if (n != 0)
    return push_error(L, strerror(errno));
  lua_pushboolean(L, 1);
  return 1;
}

/* getoption(name) -> its value (a boolean; "linger": {on =, timeout =}) */
static int l_getoption(lua_State *L) {
  ts_stream *s = check_self(L);
  int i = luaL_checkoption(L, 2, NULL, option_names), on = 0, n;
  struct linger lg;
  socklen_t len;
  uv_os_fd_t fd;

  if ((n = option_fd(L, s, &fd)) != 0)
    return n;
  if (option_ids[i] == SO_LINGER) {
    len = sizeof(lg);
    if (getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &len) != 0)
      return push_error(L, strerror(errno));
    lua_createtable(L, 0, 2);
    lua_pushboolean(L, lg.l_onoff);
    lua_setfield(L, -2, "on");
    lua_pushinteger(L, lg.l_linger);
    lua_setfield(L, -2, "timeout");
    return 1;
  }
  len = sizeof(on);
  if (getsockopt(fd, option_levels[i], option_ids[i], &on, &len) != 0)
    return push_error(L, strerror(errno));
  lua_pushboolean(L, on != 0);
  return 1;
}

static int push_endpoint(lua_State *L, int peer) {
  ts_stream *s = check_self(L);
  struct sockaddr_storage ss;
  int len = sizeof(ss), err;

  if (s->flags & F_HCLOSING)
    return push_error(L, "closed");
  if (s->flags & F_PIPE) {
    char path[1024] = ""; /* libuv reads it first (memcheck) */
    size_t n = sizeof(path);
    err = peer ? uv_pipe_getpeername(&s->h.pipe, path, &n)
               : uv_pipe_getsockname(&s->h.pipe, path, &n);
    if (err != 0)
      return push_error(L, uv_strerror(err));
    lua_pushlstring(L, path, n);
    lua_pushinteger(L, 0);
    lua_pushliteral(L, "unix");
    return 3;
  }
  err = peer ? uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len)
             : uv_tcp_getsockname(&s->h.tcp, (struct sockaddr *)&ss, &len);
  if (err != 0)
    return push_error(L, uv_strerror(err));
  return ts__push_addr(L, (struct sockaddr *)&ss);
}

static int l_getpeername(lua_State *L) {
  return push_endpoint(L, 1);
}
static int l_getsockname(lua_State *L) {
  return push_endpoint(L, 0);
}

/* buffer_sizes() -> bytes read but not consumed, bytes not yet written */
static int l_buffer_sizes(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_pushinteger(L, (lua_Integer)ts_buf_len(&s->rbuf));
  lua_pushinteger(L, (lua_Integer)pending_writes(s));
  lua_pushinteger(L, (s->flags & F_BORROWED) ? 0 : (lua_Integer)s->rbuf.cap);
  return 3;
}

static int l_tostring(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_pushfstring(L, "tcpserver.stream (%p)%s", (void *)s,
                  (s->flags & F_CLOSED) ? " closed" : "");
  return 1;
}

/* core.read_budget([bytes]) -> budget, bytes held, streams holding them */
static int l_read_budget(lua_State *L) {
  stream_ctx *ctx = ts__stream_ctx(L);

  if (!lua_isnoneornil(L, 1)) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n > 0, 1, "budget must be a positive number of bytes");
    ctx->rbuf_budget = (size_t)n;
  }
  lua_pushinteger(L, (lua_Integer)ctx->rbuf_budget);
  lua_pushinteger(L, (lua_Integer)ctx->rbuf_bytes);
  lua_pushinteger(L, (lua_Integer)ctx->rbuf_count);
  return 3;
}

static int l_gc(lua_State *L) {
  ts__stream_collect(L, luaL_checkudata(L, 1, TS_STREAM_MT));
  return 0;
}

/* _buffered() -> the unread bytes, left in place (read_until_pattern) */
static int l_buffered(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_pushlstring(L, ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf));
  return 1;
}

void ts__stream_methods(lua_State *L, const luaL_Reg *methods) {
  luaL_getmetatable(L, TS_STREAM_MT);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, methods, 0);
  lua_pop(L, 2);
}

int ts__open_stream(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"read_until", ts__method_read_until},
      {"read_bytes", ts__method_read_bytes},
      {"read_until_close", ts__method_read_until_close},
      {"_buffered", l_buffered},
      {"_fill", ts__method_fill},
      {"write", ts__method_write},
      {"flush", ts__method_flush},
      {"close", l_close},
      {"closed", l_closed},
      {"set_close_callback", l_set_close_callback},
      {"set_timeout", l_settimeout},
      {"settimeout", l_settimeout}, /* LuaSocket's and OpenResty's name */
      {"settimeouts", l_settimeouts},
      {"set_half_open", l_set_half_open},
      {"set_nodelay", l_set_nodelay},
      {"shutdown", l_shutdown},
      {"setoption", l_setoption},
      {"getoption", l_getoption},
      {"getpeername", l_getpeername},
      {"getsockname", l_getsockname},
      {"buffer_sizes", l_buffer_sizes},
      {NULL, NULL}};
  static const luaL_Reg metamethods[] = {{"__gc", l_gc},
                                         {"__close", l_close},
                                         {"__tostring", l_tostring},
                                         {"__index", NULL},
                                         {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"read_budget", l_read_budget}, {NULL, NULL}};

  luaL_newmetatable(L, TS_STREAM_MT);
  luaL_setfuncs(L, metamethods, 0);
  lua_newtable(L);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "stream_mt"); /* exported: the Lua layer adds methods */
  ts__stream_methods(L, methods);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
