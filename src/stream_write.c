/* The write path: write() appends to the stream's write buffer, the
 * loop flushes each dirty stream once per wake-up (uv_try_write first,
 * one uv_write for the rest), and writers past the high-water mark wait
 * for their bytes to be sent. The write methods are here, beside the
 * helpers that inline into them. */
#include "stream_int.h"

#include <stdlib.h>
#include <string.h>

static void write_cb(uv_write_t *req, int status);

/* Hands the write buffer (or the layer's output) to the kernel: try_write
 * first, then one uv_write for what is left. Returns 0 or a libuv error
 * (the stream is closed). */
int ts__stream_flush(ts_stream *s) {
  ts_buf *src = layer_output(s);
  write_req *w;
  uv_buf_t b;
  int n;

  if (s->flags & F_HCLOSING)
    return 0;
  if (s->ops != NULL && s->ops->encode != NULL) {
    if ((n = s->ops->encode(s, s->layer)) != 0)
      goto fail;
    if (ts_buf_len(&s->wbuf) == 0) /* idle streams hold no buffer */
      ts_buf_release(&s->wbuf, &sctx(s)->wpool);
  }
  if (src == NULL)
    src = &s->wbuf;
  if (s->inflight != NULL || ts_buf_len(src) == 0)
    return 0;
  b = uv_buf_init(ts_buf_head(src), (unsigned)ts_buf_len(src));
  n = uv_try_write(&s->h.stream, &b, 1);
  if (n == (int)b.len) {
    ts_buf_release(src, &sctx(s)->wpool);
    return 0;
  }
  if (n < 0 && n != UV_EAGAIN)
    goto fail;
  ts_buf_consume(src, n > 0 ? (size_t)n : 0);
  w = malloc(sizeof(*w));
  n = UV_ENOMEM;
  if (w == NULL)
    goto fail;
  w->buf = *src; /* the request owns the bytes; writes go to a new buffer */
  ts_buf_init(src);
  w->req.data = s;
  b = uv_buf_init(ts_buf_head(&w->buf), (unsigned)ts_buf_len(&w->buf));
  n = uv_write(&w->req, &s->h.stream, &b, 1, write_cb);
  if (n != 0) {
    ts_buf_free(&w->buf);
    free(w);
    goto fail;
  }
  s->inflight = w;
  return 0;
fail:
  ts__stream_close(s, n);
  return n;
}

/* Bytes of write() handed to the kernel so far. With a layer the pending
 * bytes are partly its output, so this may lag: never early. */
uint64_t ts__write_sent(ts_stream *s) {
  size_t left = pending_writes(s);

  if ((s->flags & F_CLOSED) && s->rare != NULL)
    return s->rare->sent_at_close; /* the buffers go before close_cb */
  return left < s->wtotal ? s->wtotal - left : 0;
}

/* Queues the task L to wake once `until` bytes are sent. */
static int wait_written(lua_State *L, ts_stream *s, uint64_t until) {
  stream_rare *q = ts__stream_rare(s);
  write_waiter *w;
  uint64_t due;

  if (ts__stream_start_wait(s, L, 1, &due) < 0) /* with_timeout's deadline passed */
    return push_error(L, "timeout");
  if (q == NULL)
    return luaL_error(L, "write: out of memory");
  if (q->n == q->cap) {
    int cap = q->cap ? 2 * q->cap : 4;
    w = realloc(q->w, (size_t)cap * sizeof(*w));
    if (w == NULL)
      return luaL_error(L, "write: out of memory");
    q->w = w;
    q->cap = cap;
  }
  w = &q->w[q->n++];
  w->until = until;
  w->due = due;
  ts_waiter_init(&w->w);
  return ts_waiter_park(&w->w, L);
}

/* Removes writer i and resumes it with `err` (NULL: success). */
static void wake_writer(ts_stream *s, int i, const char *err) {
  stream_rare *q = s->rare;
  ts_waiter w = q->w[i].w;

  memmove(&q->w[i], &q->w[i + 1], (size_t)(q->n - i - 1) * sizeof(q->w[0]));
  q->n--;
  stop_timer(s);
  if (err != NULL) {
    ts_waiter_wake_error(&w, err);
    return;
  }
  lua_pushboolean(w.co, 1);
  ts_waiter_wake(&w, 1);
}

/* Wakes, in order, the writers whose bytes are sent, or all of them with
 * `err`. A woken task may write and wait again: rescan from the start. */
static void wake_writers(ts_stream *s, const char *err) {
  int i = 0;

  while (s->rare != NULL && i < s->rare->n) {
    if (err != NULL || ts__write_sent(s) >= s->rare->w[i].until) {
      wake_writer(s, i, err);
      i = 0;
    } else {
      i++;
    }
  }
}

void ts__write_timeouts(ts_stream *s, uint64_t now, uint64_t *next) {
  int i = 0;

  while (writing(s) && i < s->rare->n) {
    if (ts__wait_expired(s->rare->w[i].due, now, next))
      wake_writer(s, i, "timeout");
    else
      i++;
  }
}

void ts__write_forget(ts_stream *s, lua_State *co) {
  stream_rare *q = s->rare;
  int i = 0;

  while (q != NULL && i < q->n) {
    if (q->w[i].w.co == co) {
      luaL_unref(s->loop->L, LUA_REGISTRYINDEX, q->w[i].w.ref);
      memmove(&q->w[i], &q->w[i + 1], (size_t)(q->n - i - 1) * sizeof(q->w[0]));
      q->n--;
    } else {
      i++;
    }
  }
  stop_timer(s);
}

/* Once closed, writers whose bytes were not sent by then fail, as in
 * Tornado: a close does not wait for a peer that stopped reading. */
void ts__write_check(ts_stream *s) {
  if (!writing(s))
    return;
  wake_writers(s, NULL);
  if (s->flags & F_CLOSED)
    wake_writers(s, ts__stream_error(s));
}

static void write_cb(uv_write_t *req, int status) {
  ts_stream *s = req->data;
  write_req *w = (write_req *)req;

  if (status < 0 && status != UV_ECANCELED)
    ts__stream_close(s, status); /* with these bytes still counted unsent */
  ts_buf_release(&w->buf, &sctx(s)->wpool);
  free(w);
  s->inflight = NULL;
  if (status < 0)
    return;
  if (ts__stream_flush(s) != 0)
    return;
  if ((s->flags & F_CLOSED) && pending_writes(s) == 0) {
    ts__stream_handle_close(s);
    return;
  }
  if (s->flags & F_SHUT_QUEUED)
    ts__stream_send_fin(s);
  ts__write_check(s);
}

void ts__write_mark_dirty(ts_stream *s) {
  stream_ctx *ctx = sctx(s);

  if (s->flags & F_DIRTY)
    return;
  if (ctx->ndirty == ctx->cap) {
    size_t cap = ctx->cap ? 2 * ctx->cap : 64;
    ts_stream **d = realloc(ctx->dirty, cap * sizeof(*d));
    if (d == NULL) { /* no room to defer it: flush now */
      ts__stream_flush(s);
      return;
    }
    ctx->dirty = d;
    ctx->cap = cap;
  }
  s->flags |= F_DIRTY;
  ctx->dirty[ctx->ndirty++] = s;
}

/* The loop's settle hook: one flush per stream per wake-up. */
void ts__write_flush_dirty(ts_loop *loop) {
  stream_ctx *ctx = loop->streams;
  ts_stream *s;

  while (ctx->ndirty > 0) {
    s = ctx->dirty[--ctx->ndirty];
    s->flags &= ~F_DIRTY;
    ts__stream_flush(s);
    if (s->flags & F_CLOSED) /* writers closed on (see ts__stream_close) */
      ts__write_check(s);
  }
}

/* Whether len more bytes on top of *pending pass MAX_PENDING; if not,
 * they are counted in *pending. */
static int over_pending(size_t *pending, size_t len) {
  if (*pending >= MAX_PENDING || len > MAX_PENDING - *pending)
    return 1;
  *pending += len;
  return 0;
}

/* The items of write({...}) that one pass gathers: a batch of replies. */
#define GATHER_MAX 32

/* Whether item i of the array at 2 is a string; its bytes then. */
static int array_item(lua_State *L, lua_Integer i, int raw, const char **p, size_t *len) {
  int t = raw ? lua_rawgeti(L, 2, i) : lua_geti(L, 2, i);

  *p = t == LUA_TSTRING ? lua_tolstring(L, -1, len) : NULL;
  lua_pop(L, 1);
  return *p != NULL;
}

/* write({...}): the strings of an array, in order, all or none: a bad
 * item or a batch past MAX_PENDING is refused before anything is queued
 * (a reply half queued would answer the next request). A plain table of
 * up to GATHER_MAX items is looked at once: its strings stay anchored in
 * it while their bytes are copied, and the buffer grows once. Larger
 * ones, or one with a metatable (whose __index may make strings nobody
 * holds), are looked at twice. */
static int append_array(lua_State *L, ts_stream *s, size_t *pending) {
  size_t lens[GATHER_MAX], total = *pending, before = ts_buf_len(&s->wbuf);
  const char *ptrs[GATHER_MAX];
  lua_Integer i, n;
  int raw, gather;

  luaL_argexpected(L, lua_type(L, 2) == LUA_TTABLE, 2, "string or array of strings");
  raw = !lua_getmetatable(L, 2) || (lua_pop(L, 1), 0);
  n = raw ? (lua_Integer)lua_rawlen(L, 2) : luaL_len(L, 2);
  gather = raw && n <= GATHER_MAX;
  for (i = 1; i <= n; i++) {
    const char *p;
    size_t len;
    if (!array_item(L, i, raw, &p, &len))
      return luaL_error(L, "bad argument #1 to 'write' (item %d is not a string)",
                        (int)i);
    if (over_pending(&total, len))
      return UV_E2BIG;
    if (gather) {
      ptrs[i - 1] = p;
      lens[i - 1] = len;
    }
  }
  if (total > *pending && ts_buf_reserve(&s->wbuf, total - *pending, (size_t)-1) != 0)
    return UV_ENOMEM;
  for (i = 1; i <= n; i++) {
    const char *p = gather ? ptrs[i - 1] : NULL;
    size_t len = gather ? lens[i - 1] : 0;
    if (!gather && !array_item(L, i, raw, &p, &len))
      p = NULL;
    /* an __index may answer the second look otherwise than the first */
    if (p == NULL || ts_buf_len(&s->wbuf) - before + len > total - *pending ||
        ts_buf_append(&s->wbuf, p, len) != 0) {
      int changed = p != NULL && ts_buf_len(&s->wbuf) - before + len > total - *pending;
      s->wbuf.end = s->wbuf.start + (uint32_t)before; /* appends only added */
      if (p == NULL || changed)
        return luaL_error(L, "write: the array changed while it was written");
      return UV_ENOMEM;
    }
  }
  if (ts_buf_len(&s->wbuf) - before != total - *pending) { /* shorter this time */
    s->wbuf.end = s->wbuf.start + (uint32_t)before;
    return luaL_error(L, "write: the array changed while it was written");
  }
  count_out(s, total - *pending);
  *pending = total;
  return 0;
}

/* A large string with nothing queued before it goes to the kernel at once,
 * straight from the Lua string: copying it into the write buffer first
 * would cost more than the syscall that batching saves. Returns 1 if it
 * does not apply, else 0 (the rest, if any, is appended) or an error. */
static int write_direct(ts_stream *s, const char *p, size_t len, size_t pending) {
  uv_buf_t b;
  int n;

  if (len < DIRECT_WRITE_MIN || len > INT_MAX || s->ops != NULL || pending > 0)
    return 1;
  b = uv_buf_init((char *)p, (unsigned)len);
  n = uv_try_write(&s->h.stream, &b, 1);
  if (n == UV_EAGAIN)
    n = 0;
  if (n < 0) {
    ts__stream_close(s, n);
    return n;
  }
  return ts_buf_append(&s->wbuf, p + n, len - (size_t)n) ? UV_ENOMEM : 0;
}

/* Queues one string (the common case, fetched once) or an array of them.
 * *pending: the unsent bytes before, and after (a direct write aside). */
static int append_arg(lua_State *L, ts_stream *s, size_t *pending) {
  size_t len, before = *pending;
  const char *p;
  int rc;

  if (lua_type(L, 2) != LUA_TSTRING) {
    ts_buf_adopt(&s->wbuf, &sctx(s)->wpool);
    return append_array(L, s, pending);
  }
  p = lua_tolstring(L, 2, &len);
  if (over_pending(pending, len))
    return UV_E2BIG;
  count_out(s, len);
  rc = write_direct(s, p, len, before);
  if (rc != 1)
    return rc;
  ts_buf_adopt(&s->wbuf, &sctx(s)->wpool);
  return ts_buf_append(&s->wbuf, p, len) ? UV_ENOMEM : 0;
}

int ts__method_write(lua_State *L) {
  ts_stream *s = check_self(L);
  size_t pending;
  int rc;

  if (s->flags & (F_CLOSED | F_SHUT_WR)) { /* shut: "closed" for writing */
    luaL_checkany(L, 2);
    return push_error(L, (s->flags & F_CLOSED) ? ts__stream_error(s) : "closed");
  }
  pending = pending_writes(s); /* once per write: the common path */
  rc = append_arg(L, s, &pending);
  if (rc == UV_ENOMEM)
    return luaL_error(L, "write: out of memory");
  if (rc == UV_E2BIG) /* the stream stays open */
    return push_error(L, "too large");
  if (rc != 0)
    return push_error(L, ts__stream_error(s));
  if (ts_buf_len(&s->wbuf) > 0)
    ts__write_mark_dirty(s);
  /* pending is an upper bound: a direct write may have sent some already */
  if (pending > WRITE_HIGH_WATER && ts__can_wait(L) &&
      pending_writes(s) > WRITE_HIGH_WATER) {
    if (ts__stream_flush(s) != 0)
      return push_error(L, ts__stream_error(s));
    if (pending_writes(s) > WRITE_HIGH_WATER)
      return wait_written(L, s, s->wtotal - WRITE_HIGH_WATER / 2);
  }
  lua_pushboolean(L, 1);
  return 1;
}

int ts__method_flush(lua_State *L) {
  ts_stream *s = check_self(L);

  if (s->flags & F_CLOSED)
    return push_error(L, ts__stream_error(s));
  if (ts__stream_flush(s) != 0)
    return push_error(L, ts__stream_error(s));
  if (pending_writes(s) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  ts__check_task(L, "flush");
  return wait_written(L, s, s->wtotal);
}

void ts__write_unlink_dirty(ts_stream *s) {
  stream_ctx *ctx = sctx(s);
  size_t i;

  for (i = 0; i < ctx->ndirty; i++) {
    if (ctx->dirty[i] == s) {
      memmove(ctx->dirty + i, ctx->dirty + i + 1, (ctx->ndirty - i - 1) * sizeof(s));
      ctx->ndirty--;
      break;
    }
  }
  s->flags &= ~F_DIRTY;
}
