/* The stream's lifecycle: creation, the owner, the wait timer, layers,
 * closing and collection. The read and write paths are in stream_read.c
 * and stream_write.c, the Lua methods in stream_lua.c; stream_int.h is
 * what they share. */
#include "stream_int.h"

#include <stdio.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <string.h>

uv_stream_t *ts__stream_handle(ts_stream *s) {
  return &s->h.stream;
}

ts_loop *ts__stream_loop(ts_stream *s) {
  return s->loop;
}

/* The rare part, made if need be; NULL once the handle closed, or when
 * out of memory (then the stream does without). */
stream_rare *ts__stream_rare(ts_stream *s) {
  stream_rare *r = s->rare;

  if (r != NULL || (s->flags & F_DONE))
    return r;
  r = s->rare = calloc(1, sizeof(*r));
  if (r != NULL) {
    r->close_cb_ref = LUA_NOREF;
    r->read_due = NO_LIMIT;
  }
  return r;
}

/* The timer is closed already (handle_close made it NULL) or never will
 * be: at lua_close the loop runs no more, and a stream still open then
 * (one whose peer ended while nobody read) takes its timer along. */
static void free_rare(ts_stream *s) {
  free(s->rare->timer);
  free(s->rare->w);
  free(s->rare);
  s->rare = NULL;
}

void ts__stream_set_timeouts(ts_stream *s, double read, double send) {
  int on = ts__timeout_ms(read) > 0 || ts__timeout_ms(send) > 0;
  stream_rare *r = on ? ts__stream_rare(s) : s->rare;

  if (r == NULL)
    return;
  r->timeout = ts__timeout_ms(read) > 0 ? (float)read : 0;
  r->wtimeout = ts__timeout_ms(send) > 0 ? (float)send : 0;
}

void ts__stream_set_timeout(ts_stream *s, double seconds) {
  ts__stream_set_timeouts(s, seconds, seconds);
}

double ts__stream_timeout(ts_stream *s) {
  return s->rare != NULL ? s->rare->timeout : 0;
}

int ts__stream_closed(ts_stream *s) {
  return (s->flags & F_CLOSED) != 0;
}

const char *ts__stream_error(ts_stream *s) {
  const char *why =
      s->ops != NULL && s->ops->error != NULL ? s->ops->error(s->layer) : NULL;
  return why != NULL ? why : ts__errname(s->err);
}
/* ---- the owner ---- */

/* After the close callback, and the owner's end if it has one. */
static void release_tally(lua_State *L, ts_stream *s) {
  if (s->tally != NULL)
    s->tally->release(L, s->tally);
  s->tally = NULL;
}

static void unpin(lua_State *L, ts_stream *s) {
  release_tally(L, s);
  luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
  s->self_ref = LUA_NOREF;
}

void ts__stream_keep(lua_State *L, ts_stream *s) {
  ts__stream_push(L, s);
  lua_insert(L, -2);
  lua_setiuservalue(L, -2, 2);
  lua_pop(L, 1);
}

void ts__stream_push_kept(lua_State *L, ts_stream *s) {
  ts__stream_push(L, s);
  lua_getiuservalue(L, -1, 2);
  lua_remove(L, -2);
}

ts_loop **ts__stream_own(ts_stream *s) {
  s->flags |= F_OWNED;
  return &s->loop;
}

ts_stream *ts__stream_of_owner(void *owner) {
  return owner; /* the address of its first member */
}

void ts__stream_disown(lua_State *L, ts_stream *s) {
  s->flags &= ~F_OWNED;
  if (s->flags & F_DONE)
    unpin(L, s);
}

typedef struct each_arg {
  void (*fn)(ts_stream *s, void *arg);
  void *arg;
} each_arg;

/* A handle is a stream's when its data points at the struct around it
 * (checked before anything else of that struct, which may not exist). */
static void each_cb(uv_handle_t *h, void *arg) {
  each_arg *e = arg;
  uintptr_t at = (uintptr_t)h - offsetof(ts_stream, h);
  ts_stream *s = (ts_stream *)at;

  if ((h->type == UV_TCP || h->type == UV_NAMED_PIPE) && (uintptr_t)h->data == at &&
      !(s->flags & F_CLOSED))
    e->fn(s, e->arg);
}

void ts__stream_each(ts_loop *loop, void (*fn)(ts_stream *s, void *arg), void *arg) {
  each_arg e = {fn, arg};
  uv_walk(loop->uv, each_cb, &e);
}

void ts__stream_keep_open(ts_stream *s, int on) {
  if (on)
    s->flags |= F_KEEP_OPEN;
  else
    s->flags &= ~F_KEEP_OPEN;
}

void ts__stream_count_into(ts_stream *s, ts_tally *t) {
  s->tally = t;
}

ts_tally *ts__stream_tally(ts_stream *s) {
  return s->tally;
}

/* ---- the wait timer ---- */

static void wait_timer_cb(uv_timer_t *t);

static void start_timer(ts_stream *s, uint64_t ms) {
  stream_rare *r = ts__stream_rare(s);

  if (r == NULL)
    return; /* no timeout then, rather than no stream */
  if (r->timer == NULL) {
    r->timer = malloc(sizeof(*r->timer));
    if (r->timer == NULL)
      return;
    uv_timer_init(s->h.handle.loop, r->timer);
    r->timer->data = s;
  }
  uv_timer_start(r->timer, wait_timer_cb, ms, 0);
  uv_ref((uv_handle_t *)r->timer); /* stop_timer may have unref'd it */
}

/* Task L begins a wait; *due is when it runs out (loop time, ms), or
 * NO_LIMIT: the stream's timeout from now, or L's deadline if sooner
 * (ioloop.with_timeout). Returns -1, arming nothing, if that deadline has
 * passed. Each wait has its own due time: a reader and writers wait at
 * once. A timer still armed from an earlier wait is kept if it fires no
 * later than this one ends: the callback then arms it for the rest.
 * Restarting it per wait cost two timer-heap operations per request (a
 * read per request, a stop per wake). */
int ts__stream_start_wait(ts_stream *s, lua_State *L, int write, uint64_t *due) {
  stream_rare *r = s->rare;
  float t = r == NULL ? 0 : write ? r->wtimeout : r->timeout;
  uint64_t ms = t > 0 ? ts__timeout_ms(t) : 0;
  int cut = ts__wait_limit(L, &ms);

  *due = NO_LIMIT;
  if (cut < 0)
    return -1;
  if (ms == 0 || (r == NULL && (r = ts__stream_rare(s)) == NULL))
    return 0;
  *due = uv_now(s->h.handle.loop) + ms;
  if (r->timer != NULL && uv_is_active((uv_handle_t *)r->timer) &&
      uv_timer_get_due_in(r->timer) <= ms)
    uv_ref((uv_handle_t *)r->timer);
  else
    start_timer(s, ms);
  return 0;
}

/* ---- for layers ---- */

void ts__stream_attach(ts_stream *s, const ts_layer_ops *ops, void *layer) {
  s->ops = ops;
  s->layer = layer;
}

void *ts__stream_layer(ts_stream *s, const ts_layer_ops *ops) {
  return s->ops == ops ? s->layer : NULL;
}

const char *ts__stream_busy(ts_stream *s) {
  if (s->reader != NULL || writing(s))
    return "a read or write is pending";
  if (ts_buf_len(&s->rbuf) > 0 || ts_buf_len(&s->wbuf) > 0 || s->inflight != NULL)
    return "plain data is buffered";
  return NULL;
}

ts_buf *ts__stream_plain(ts_stream *s) {
  return &s->wbuf;
}

/* ---- closing ---- */

static void timer_free(uv_handle_t *h) {
  free(h);
}

/* libuv is done with the handle: wake every waiter, run the close
 * callback, and unpin (a task still running on the stream keeps it). */
static void close_cb(uv_handle_t *h) {
  ts_stream *s = h->data;
  stream_ctx *ctx = sctx(s);
  lua_State *L = ctx->loop->L;

  ts__stream_push(L, s); /* held here: a task that ends may disown it */
  if (s->flags & F_DIRTY)
    ts__write_unlink_dirty(s);
  if (ctx->yielding == s) /* a new stream may come at this address */
    ctx->yielding = NULL;
  ts_buf_release(&s->wbuf, &ctx->wpool);
  s->flags |= F_DONE;
  if (s->ops != NULL && s->ops->closed != NULL)
    s->ops->closed(s, s->layer);
  if (s->reader != NULL)
    ts__read_wake(s, ts__read_try(s, s->reader));
  if (s->reader == NULL) {       /* an ended task must not stay */
    lua_pushnil(L);              /* anchored in an open-ended */
    lua_setiuservalue(L, -2, 1); /* stream (the collector would */
  }                              /* walk it again and again) */
  if (ts_buf_len(&s->rbuf) == 0 && !(s->flags & F_BORROWED))
    ts__read_free_buf(s); /* out of the read budget now */
  ts__write_check(s);
  if (s->rare != NULL) { /* woken writers cannot wait again: closed */
    int ref = s->rare->close_cb_ref;
    free_rare(s);
    if (ref != LUA_NOREF) {
      lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
      luaL_unref(L, LUA_REGISTRYINDEX, ref);
      ts__pcall(ctx->loop, 0);
    }
  }
  if (!(s->flags & F_OWNED))
    unpin(L, s);
  lua_pop(L, 1);
}

/* On Linux, close() of a socket with received bytes nobody read sends a
 * reset, which drops what is still unsent: a client that wrote 1 MiB and
 * closed lost most of it to a TLS session ticket it had not read. A clean
 * close takes such bytes first (at most 64 KiB: past that a reset is the
 * answer to a flood). A stream that saw the end has nothing to take. */
static void drain(ts_stream *s) {
  uv_os_fd_t fd;
  char buf[4096];
  int i;

  if (s->err != 0 || (s->flags & (F_EOF | F_PIPE)) || uv_fileno(&s->h.handle, &fd) != 0)
    return;
  for (i = 0; i < 16 && recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0; i++)
    ;
}

void ts__stream_handle_close(ts_stream *s) {
  if (s->flags & F_HCLOSING)
    return;
  drain(s);
  s->flags |= F_HCLOSING;
  if (s->rare != NULL && s->rare->timer != NULL) {
    uv_close((uv_handle_t *)s->rare->timer, timer_free);
    s->rare->timer = NULL;
  }
  uv_close(&s->h.handle, close_cb);
}

/* Ends the stream. A clean close (err 0) first hands what is written to the
 * kernel, for at most LINGER_MS; an error drops it. */
void ts__stream_close(ts_stream *s, int err) {
  if (s->flags & F_CLOSED) {
    if (err != 0 && !(s->flags & F_HCLOSING))
      ts__stream_handle_close(s);
    return;
  }
  if (writing(s)) {
    /* Their fate is told after the current task or callback (the dirty
     * list): close() may run inside a task, which must not resume others. */
    s->rare->sent_at_close = ts__write_sent(s);
    ts__write_mark_dirty(s);
  }
  s->flags |= F_CLOSED;
  if (err != 0) {
    s->err = err;
    if (!ts__quiet_error(err) && err != UV_ECANCELED && err != UV_E2BIG) {
      char msg[128];
      snprintf(msg, sizeof(msg), "stream error: %s", uv_strerror(err));
      ts__report(s->loop, msg);
    }
  }
  ts__read_stop(s);
  if (err == 0 && s->ops != NULL && s->ops->shutdown != NULL)
    s->ops->shutdown(s, s->layer);
  if (err == 0 && ts__stream_flush(s) != 0)
    return;
  if (err != 0 || pending_writes(s) == 0)
    ts__stream_handle_close(s);
  else
    start_timer(s, LINGER_MS);
}

/* ---- half-close ---- */

static void shutdown_cb(uv_shutdown_t *req, int status) {
  (void)status; /* ECANCELED if the handle closed first */
  free(req);
}

void ts__stream_send_fin(ts_stream *s) {
  uv_shutdown_t *req;

  if (!(s->flags & F_SHUT_QUEUED) || (s->flags & (F_CLOSED | F_HCLOSING)) ||
      pending_writes(s) > 0)
    return;
  s->flags &= ~F_SHUT_QUEUED;
  req = malloc(sizeof(*req));
  if (req != NULL && uv_shutdown(req, &s->h.stream, shutdown_cb) != 0)
    free(req);
}

/* shutdown(["send" | "both"]): "send" ends this side's sending once what
 * was written has gone (with TLS, after a close_notify): the peer reads
 * the end, and this side reads on; later writes get nil, "closed".
 * "both" (the default, as LuaSocket's) closes. */
int ts__stream_shutdown(lua_State *L, ts_stream *s, const char *how) {
  if (strcmp(how, "both") == 0) {
    if (!(s->flags & F_DONE) && s->self_ref != LUA_NOREF)
      ts__stream_close(s, 0);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (strcmp(how, "send") != 0)
    return luaL_error(L, "shutdown: \"send\" or \"both\" expected, got '%s'", how);
  if (s->flags & F_CLOSED)
    return push_error(L, ts__stream_error(s));
  /* Over TLS the close_notify it sends made this side read its own end
   * at once (OpenSSL's read after SSL_shutdown); not offered until that
   * is sorted out. */
  if (s->ops != NULL)
    return push_error(L, "shutdown(\"send\") is not supported over TLS yet");
  if (!(s->flags & F_SHUT_WR)) {
    s->flags |= F_SHUT_WR | F_SHUT_QUEUED;
    if (ts__stream_flush(s) != 0)
      return push_error(L, ts__stream_error(s));
    ts__stream_send_fin(s);
  }
  lua_pushboolean(L, 1);
  return 1;
}

void ts__stream_fail(ts_stream *s, int err) {
  if (s->flags & F_CLOSED)
    return;
  s->err = err;
  ts__stream_close(s, 0); /* sends what the layer queued (an alert), then closes */
}

/* Closes at once, dropping unwritten data (used when a server stops). */
void ts__stream_abort(ts_stream *s) {
  ts__stream_close(s, UV_ECANCELED);
}

static void wait_timer_cb(uv_timer_t *t) {
  ts_stream *s = t->data;
  stream_rare *r = s->rare;
  lua_State *reader = s->reader;
  uint64_t now = uv_now(t->loop), next = NO_LIMIT;

  if (s->flags & F_CLOSED) { /* the linger ran out */
    ts__stream_handle_close(s);
    return;
  }
  if (reader == NULL && !writing(s))
    return; /* armed for a wait that is over */
  /* Each wait by its own due time: one that goes on (a reader while
   * writers come and go) must not be put off by the others. A woken task
   * may wait again at once: that wait is due later, so it has not run out. */
  ts__write_timeouts(s, now, &next);
  if (reader != NULL && s->reader == reader &&
      ts__wait_expired(r->read_due, now, &next)) {
    ts__read_failed(s, reader, "timeout");
    ts__read_wake(s, 2);
    ts__read_update(s); /* not for a write-only pipe: it cannot read */
  }
  if (next != NO_LIMIT && !(s->flags & F_CLOSED) &&
      (!uv_is_active((uv_handle_t *)t) || uv_timer_get_due_in(t) > next))
    uv_timer_start(t, wait_timer_cb, next, 0);
}

void ts__stream_collect(lua_State *L, ts_stream *s) {
  /* A stream is pinned until its close callback, so here libuv is done. */
  if (!(s->flags & F_BORROWED))
    ts__read_free_buf(s);
  if (s->ops != NULL && s->ops->free != NULL)
    s->ops->free(L, s->layer);
  s->ops = NULL;
  if (s->rare != NULL) /* close_cb never ran (lua_close) */
    free_rare(s);
  release_tally(L, s); /* if close_cb never ran (lua_close) */
}

/* ---- creation ---- */

static void free_ctx(ts_loop *loop) {
  stream_ctx *ctx = loop->streams;
  int i;

  for (i = 0; i < ctx->wpool.n; i++)
    ts_buf_free(&ctx->wpool.item[i]);
  free(ctx->dirty);
  free(ctx);
  loop->streams = NULL;
}

/* The streams' share of L's loop, made with the first stream. */
static void forget_on(ts_stream *s, void *co) {
  ts__read_forget(s, co);
  ts__write_forget(s, co);
  if (s->ops != NULL && s->ops->forget != NULL)
    s->ops->forget(s, s->layer, co);
}

/* Every stream whose close callback has not run, closed ones too (a
 * reader or writer may wait on one until then). */
static void forget_cb(uv_handle_t *h, void *co) {
  uintptr_t at = (uintptr_t)h - offsetof(ts_stream, h);
  ts_stream *s = (ts_stream *)at;

  if ((h->type == UV_TCP || h->type == UV_NAMED_PIPE) && (uintptr_t)h->data == at &&
      !(s->flags & F_DONE))
    forget_on(s, co);
}

/* A killed task's waits on streams end, so that another task may read or
 * write them. */
static void forget_task(ts_loop *loop, lua_State *co) {
  uv_walk(loop->uv, forget_cb, co);
}

stream_ctx *ts__stream_ctx(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  stream_ctx *ctx = loop->streams;

  if (ctx != NULL)
    return ctx;
  ctx = calloc(1, sizeof(*ctx));
  if (ctx == NULL)
    luaL_error(L, "tcpserver: out of memory");
  ctx->loop = loop;
  ctx->rbuf_budget = ts__read_default_budget();
  loop->streams = ctx;
  ts__loop_on_settle(loop, ts__write_flush_dirty);
  ts__loop_on_forget(loop, forget_task);
  ts__loop_on_close(loop, free_ctx);
  return ctx;
}

void ts__stream_configure(ts_stream *s, size_t max_buffer, size_t chunk, double timeout) {
  s->max_buffer = (uint32_t)(max_buffer < UINT32_MAX ? max_buffer : UINT32_MAX);
  s->chunk = (uint32_t)(chunk < s->max_buffer ? chunk : s->max_buffer);
  ts__stream_set_timeout(s, timeout);
}

ts_stream *ts__stream_new(lua_State *L, int is_pipe) {
  stream_ctx *ctx = ts__stream_ctx(L);
  size_t size = STREAM_SIZE(is_pipe);
  ts_stream *s = lua_newuserdatauv(L, size, 2); /* reader, kept */

  memset(s, 0, size);
  s->loop = ctx->loop;
  luaL_setmetatable(L, TS_STREAM_MT);
  if (is_pipe) {
    uv_pipe_init(ctx->loop->uv, &s->h.pipe, 0);
    s->flags |= F_PIPE;
  } else {
    uv_tcp_init(ctx->loop->uv, &s->h.tcp);
  }
  s->h.handle.data = s;
  /* The Lua layer passes its defaults; these only make a bare stream work. */
  ts__stream_configure(s, 100 * 1024 * 1024, 64 * 1024, 0);
  /* Pinned until the close callback: libuv owns the handle until then. */
  lua_pushvalue(L, -1);
  s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return s;
}

int ts__stream_start(ts_stream *s) {
  ts__read_update(s);
  return (s->flags & F_CLOSED) ? s->err : 0;
}

void ts__stream_push(lua_State *L, ts_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
}
