/* The read path: the read budget (the loop's private read buffers
 * together), the shared read buffer that idle streams borrow, read
 * requests, and the read methods beside them (so that their helpers
 * inline).
 *
 * While a stream has nothing buffered, libuv reads into the loop's shared
 * buffer; a request that the new bytes satisfy is answered straight from
 * there and only the remainder is copied into the stream's own buffer. An
 * idle connection therefore holds no read buffer. */
#include "stream_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the read budget: the loop's private read buffers together ---- */

static void account(stream_ctx *ctx, size_t before, size_t after) {
  ctx->rbuf_bytes += after - before; /* wraps back when after < before */
  ctx->rbuf_count += (before == 0 && after > 0) - (before > 0 && after == 0);
}

/* Past the budget, a buffer may still grow while it holds less than its
 * share, so the largest buffers are the ones refused and the total stays
 * under about twice the budget (buffers grow by doubling). */
static int over_budget(stream_ctx *ctx, ts_stream *s, size_t room) {
  size_t cap = s->rbuf.cap, growth = room > cap ? room : cap, share;

  if (ctx->rbuf_bytes + growth <= ctx->rbuf_budget)
    return 0;
  share = ctx->rbuf_budget / (ctx->rbuf_count + (cap == 0));
  return cap + room > share;
}

/* ts_buf_reserve on s's own read buffer, within the budget: 0, UV_E2BIG
 * (the stream must end: "too large") or UV_ENOMEM. */
static int reserve(ts_stream *s, size_t room) {
  size_t before = s->rbuf.cap;

  if (ts_buf_room(&s->rbuf) >= room)
    return 0;
  if (s->rbuf.cap - ts_buf_len(&s->rbuf) >= room) /* compacting will do */
    return ts_buf_reserve(&s->rbuf, room, s->max_buffer) ? UV_ENOMEM : 0;
  if (over_budget(sctx(s), s, room))
    return UV_E2BIG;
  if (ts_buf_reserve(&s->rbuf, room, s->max_buffer) != 0)
    return UV_ENOMEM;
  account(sctx(s), before, s->rbuf.cap);
  return 0;
}

void ts__read_free_buf(ts_stream *s) {
  account(sctx(s), s->rbuf.cap, 0);
  ts_buf_free(&s->rbuf);
}

/* Ends a stream whose buffer the budget refused; its reader, if any, gets
 * "too large" with what was read so far. */
static void refuse_growth(ts_stream *s) {
  stream_ctx *ctx = sctx(s);
  char msg[160];

  snprintf(msg, sizeof(msg),
           "read buffers over the budget (%zu of %zu bytes): "
           "closing a connection holding %zu",
           ctx->rbuf_bytes, ctx->rbuf_budget, ts_buf_len(&s->rbuf));
  ts__log(ctx->loop, "warning", msg);
  ts__stream_close(s, UV_E2BIG);
}

static void reserve_failed(ts_stream *s, int err) {
  if (err == UV_E2BIG)
    refuse_growth(s);
  else
    ts__stream_close(s, err);
}

/* A quarter of the memory this process may use (its cgroup's limit, if
 * lower than the machine's). */
size_t ts__read_default_budget(void) {
  uint64_t total = uv_get_total_memory(), limit = uv_get_constrained_memory();

  if (limit > 0 && limit < total)
    total = limit;
  if (total == 0)
    total = (uint64_t)4 << 30;
  total /= 4;
  return total < SIZE_MAX ? (size_t)total : SIZE_MAX;
}

/* ---- the shared read buffer ---- */

/* Copies what is left of a borrowed shared buffer into the stream's own. */
static void unborrow(ts_stream *s) {
  ts_buf shared = s->rbuf;
  int err;

  if (!(s->flags & F_BORROWED))
    return;
  s->flags &= ~F_BORROWED;
  sctx(s)->borrower = NULL;
  ts_buf_init(&s->rbuf);
  if (ts_buf_len(&shared) == 0)
    return;
  err = reserve(s, ts_buf_len(&shared));
  if (err != 0)
    reserve_failed(s, err);
  else
    ts_buf_append(&s->rbuf, ts_buf_head(&shared), ts_buf_len(&shared));
}

/* Lends the shared buffer as s's empty read buffer, unless another stream
 * holds it (its task may be running and reading it). */
static int borrow(ts_stream *s) {
  stream_ctx *ctx = sctx(s);

  if (ctx->borrower != NULL)
    return ctx->borrower == s;
  ts__read_free_buf(s);
  s->rbuf.data = ctx->shared;
  s->rbuf.cap = SHARED_READ_SIZE;
  s->flags |= F_BORROWED;
  ctx->borrower = s;
  return 1;
}

/* ---- reading ---- */

static int push_consume(ts_stream *s, lua_State *L, size_t n) {
  lua_pushlstring(L, ts_buf_head(&s->rbuf), n);
  ts_buf_consume(&s->rbuf, n);
  s->scan = 0;
  s->rmode = RD_NONE;
  return 1;
}

int ts__read_failed(ts_stream *s, lua_State *L, const char *err) {
  s->rmode = RD_NONE;
  s->scan = 0;
  return push_error(L, err);
}

/* Past max_bytes or max_buffer_size: nil, "too large", and the stream
 * closes. A read_until that said "keep" instead gets the first max_bytes
 * as its partial result (consumed) and the stream stays open, so that the
 * caller may send a refusal of its own and skip the rest (iostream.lua's
 * skip_until). */
static int fail_too_large(ts_stream *s, lua_State *L) {
  size_t n = ts_buf_len(&s->rbuf);

  ts__read_failed(s, L, "too large");
  if (!(s->flags & F_KEEP_ON_LIMIT)) {
    ts__stream_close(s, 0);
    return 2;
  }
  s->flags &= ~F_KEEP_ON_LIMIT;
  n = n < s->rn ? n : s->rn;
  lua_pushlstring(L, ts_buf_head(&s->rbuf), n);
  ts_buf_consume(&s->rbuf, n);
  return 3;
}

/* The peer is gone: hand over what is left as the partial result. */
static int fail_closed(ts_stream *s, lua_State *L) {
  int closed = (s->flags & F_CLOSED) != 0;

  ts__read_failed(s, L, closed ? ts__stream_error(s) : "closed");
  lua_pushlstring(L, ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf));
  ts_buf_consume(&s->rbuf, ts_buf_len(&s->rbuf));
  if (!(s->flags & F_HALF_OPEN)) /* half open: it may still write */
    ts__stream_close(s, 0);
  return 3;
}

/* Answers the pending read request if it can: returns the number of values
 * pushed on L (a result or an error), or 0 if it must wait for more. */
int ts__read_try(ts_stream *s, lua_State *L) {
  size_t len = ts_buf_len(&s->rbuf);
  int ended = (s->flags & (F_EOF | F_CLOSED)) != 0;
  size_t scan = s->scan;
  long at;

  switch (s->rmode) {
  case RD_UNTIL:
    at = ts_buf_find(&s->rbuf, s->delim, s->dlen, &scan);
    s->scan = (uint32_t)scan; /* under max_buffer */
    if (at >= 0) {
      if (s->rn > 0 && (size_t)at + s->dlen > s->rn)
        return fail_too_large(s, L);
      return push_consume(s, L, (size_t)at + s->dlen);
    }
    if ((s->rn > 0 && len >= s->rn) || len >= s->max_buffer)
      return fail_too_large(s, L);
    break;
  case RD_BYTES:
  case RD_PARTIAL:
    if (len >= s->rn)
      return push_consume(s, L, s->rn);
    if (s->rmode == RD_PARTIAL && len > 0)
      return push_consume(s, L, len);
    if (len >= s->max_buffer)
      return fail_too_large(s, L);
    break;
  case RD_FILL: /* more than rn bytes buffered; nothing consumed */
    if (len > s->rn) {
      s->rmode = RD_NONE;
      lua_pushboolean(L, 1);
      return 1;
    }
    if (len >= s->max_buffer)
      return fail_too_large(s, L);
    break;
  case RD_CLOSE:
    if (ended) {
      push_consume(s, L, len);
      if (!(s->flags & F_HALF_OPEN))
        ts__stream_close(s, 0);
      return 1;
    }
    if (len >= s->max_buffer)
      return fail_too_large(s, L);
    break;
  }
  return ended ? fail_closed(s, L) : 0;
}

void ts__read_wake(ts_stream *s, int nres) {
  lua_State *co = s->reader;

  sctx(s)->wakes++;
  s->reader = NULL;
  stop_timer(s);
  ts__wake(co, nres);
}

/* How much one read may add to the buffer, `want` being what it would
 * read: without a read request the buffer fills up to the high-water mark
 * and no further, whatever the pattern of arrival; with one, up to the
 * mark or `want`, so that what the request leaves unread is never more
 * than the mark. */
static size_t read_limit(ts_stream *s, size_t len, size_t want) {
  size_t mark = read_high_water(s), upto = mark > len ? mark - len : 0;

  if (s->rmode == RD_NONE)
    return want < upto ? want : upto;
  return want > upto ? want : upto;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  ts_stream *s = h->data;
  stream_ctx *ctx = sctx(s);
  size_t len = ts_buf_len(&s->rbuf), want = s->chunk, room;

  (void)suggested;
  if (ctx->yielding != NULL) { /* set for this very call of uv__read, or stale */
    int turn_over = ctx->yielding == s;
    ctx->yielding = NULL;
    if (turn_over) { /* UV_ENOBUFS: read_cb keeps reading, libuv goes on */
      *buf = uv_buf_init(NULL, 0);
      return;
    }
  }
  if (s->ops != NULL) { /* raw bytes: the layer takes them at once */
    want = read_high_water(s);
    *buf = uv_buf_init(ctx->shared,
                       want < SHARED_READ_SIZE ? (unsigned)want : SHARED_READ_SIZE);
    return;
  }
  if (len == 0 && ctx->borrower == NULL) {
    ts__read_free_buf(s);
    want = want < s->max_buffer ? want : s->max_buffer;
    *buf = uv_buf_init(ctx->shared, want < SHARED_READ_SIZE ? want : SHARED_READ_SIZE);
    return;
  }
  /* A large read_bytes reads straight into a buffer of its size. */
  if ((s->rmode == RD_BYTES || s->rmode == RD_PARTIAL) && s->rn > len + want)
    want = s->rn - len;
  room = s->max_buffer > len ? s->max_buffer - len : 0;
  if (s->rmode == RD_NONE)
    want = read_limit(s, len, want);
  want = want < room ? want : room;
  if (want == 0 || reserve(s, want) != 0) {
    if (want > 0 && over_budget(ctx, s, want))
      s->flags |= F_OVERBUDGET; /* read_cb ends it (UV_ENOBUFS) */
    *buf = uv_buf_init(NULL, 0);
    return;
  }
  want = read_limit(s, len, want); /* a request may take more than it reserved */
  room = want < room ? want : room;
  room = ts_buf_room(&s->rbuf) < room ? ts_buf_room(&s->rbuf) : room;
  *buf = uv_buf_init(ts_buf_tail(&s->rbuf), (unsigned)room);
}

/* The woken task reads what else it wants straight from the borrowed
 * buffer; only what it leaves there is copied. */
static void on_data(ts_stream *s) {
  int n;

  if (s->reader != NULL && (n = ts__read_try(s, s->reader)) > 0)
    ts__read_wake(s, n);
  unborrow(s);
  ts__read_update(s);
}

/* The peer ended, nobody reads and nothing is left to read: the stream
 * closes, unless its owner keeps it open (ts__stream_keep_open: server.c
 * says why) and no close callback asked to hear of the end at once, as in
 * Tornado. A client stream or a pipe nobody closes would keep its
 * descriptor. */
void ts__read_close_if_ended(ts_stream *s) {
  if ((s->flags & (F_EOF | F_CLOSED)) != F_EOF || s->reader != NULL ||
      ts_buf_len(&s->rbuf) != 0)
    return;
  if (!(s->flags & (F_KEEP_OPEN | F_HALF_OPEN)) ||
      (s->rare != NULL && s->rare->close_cb_ref != LUA_NOREF))
    ts__stream_close(s, 0);
}

static void on_eof(ts_stream *s) {
  s->flags |= F_EOF;
  if (s->reader != NULL)
    ts__read_wake(s, ts__read_try(s, s->reader));
  ts__read_close_if_ended(s);
  /* What nobody read yet must leave the shared buffer: the next read of
   * any stream overwrites it. */
  unborrow(s);
  ts__read_update(s);
}

/* A layer's bytes in: it may also have flushed what a writer waits for
 * (a TLS handshake releases what was written before it). */
void ts__stream_on_data(ts_stream *s) {
  on_data(s);
  ts__write_check(s);
}

void ts__stream_on_eof(ts_stream *s) {
  on_eof(s);
  ts__write_check(s);
}

/* libuv reads on while a read fills its buffer, up to 32 times (2 MiB)
 * before the loop turns. After a full read that ran a task, the next
 * alloc_cb of this stream passes (yielding) when others may be waiting:
 * other reading streams, or callbacks and timers due. They run before
 * the next 64 KiB, as in Tornado and nginx. A full read that only
 * buffered goes on, and so does a lone stream (one epoll_wait less per
 * 64 KiB of a single bulk transfer). */
static void read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  ts_stream *s = h->data;
  stream_ctx *ctx = sctx(s);
  const ts_layer_ops *ops = s->ops;
  unsigned wakes = ctx->wakes;
  int full = nread > 0 && (size_t)nread == buf->len;

  if (nread > 0 && ops != NULL) {
    ops->on_read(s, s->layer, buf->base, (size_t)nread);
  } else if (nread > 0) {
    count_in(s, (size_t)nread);
    if (buf->base == sctx(s)->shared) {
      borrow(s);
      s->rbuf.end = (uint32_t)nread;
    } else {
      s->rbuf.end += (uint32_t)nread;
    }
    on_data(s);
  } else if (nread == UV_EOF && ops != NULL && ops->on_eof != NULL) {
    ops->on_eof(s, s->layer);
  } else if (nread == UV_EOF) {
    on_eof(s);
  } else if (nread == UV_ENOBUFS && (s->flags & F_OVERBUDGET)) {
    refuse_growth(s);
  } else if (nread == UV_ENOBUFS) {
    ts__read_update(s);
  } else if (nread < 0) {
    if (ops != NULL && ops->on_error != NULL)
      ops->on_error(s, s->layer, (int)nread);
    ts__stream_close(s, (int)nread);
  }
  if (full && ctx->wakes != wakes && (s->flags & F_READING) &&
      (ctx->reading > 1 || uv_backend_timeout(h->loop) == 0))
    ctx->yielding = s;
  unborrow(s); /* the shared buffer is free between callbacks */
}

/* F_READING, counted: a burst yields only if others may be waiting. */
static void set_reading(ts_stream *s, int on) {
  if (on)
    s->flags |= F_READING;
  else
    s->flags &= ~F_READING;
  sctx(s)->reading += on ? 1 : (size_t)-1;
}

void ts__read_stop(ts_stream *s) {
  if (s->flags & F_READING) {
    uv_read_stop(&s->h.stream);
    set_reading(s, 0);
  }
}

void ts__read_update(ts_stream *s) {
  /* A layer's own bytes (a PROXY header, TLS records) are not in rbuf: it
   * reads until what it decoded reaches the mark, as a plain stream. */
  int want = !(s->flags & (F_EOF | F_CLOSED)) &&
             (s->reader != NULL || ts_buf_len(&s->rbuf) < read_high_water(s));
  int err;

  if (want && !(s->flags & F_READING)) {
    err = uv_read_start(&s->h.stream, alloc_cb, read_cb);
    if (err != 0) {
      ts__stream_close(s, err);
      return;
    }
    set_reading(s, 1);
  } else if (!want && (s->flags & F_READING)) {
    uv_read_stop(&s->h.stream);
    set_reading(s, 0);
  }
}

/* Common tail of the read methods: answer now or wait. */
static int read_request(lua_State *L, ts_stream *s, int mode, size_t n) {
  uint64_t due = NO_LIMIT;
  int r, lent;

  if (s->reader != NULL)
    return luaL_error(L, "already reading");
  s->rmode = mode;
  s->rn = (uint32_t)(n < UINT32_MAX ? n : UINT32_MAX); /* max_buffer is less */
  lent = (s->flags & F_BORROWED) != 0;                 /* by on_data, which wakes us */
  if (s->ops != NULL && s->ops->pump != NULL)          /* what it held back */
    s->ops->pump(s, s->layer);
  r = ts__read_try(s, L);
  if (!lent)
    unborrow(s);
  if (r > 0) {
    if (s->flags & F_EOF) /* it read what was left */
      ts__read_close_if_ended(s);
    ts__read_update(s);
    return r;
  }
  if (!ts__can_wait(L)) {
    s->rmode = RD_NONE;
    ts__check_task(L, "read");
  }
  /* A wait with a timeout, or in with_timeout, is due some time. */
  if ((s->rare != NULL || s->loop->ndeadlines > 0) &&
      ts__stream_start_wait(s, L, 0, &due) < 0)
    return ts__read_failed(s, L, "timeout");
  s->reader = L; /* a reader reads past the high-water mark */
  ts__read_update(s);
  s->reader = NULL;
  if (s->flags & F_CLOSED) /* update_reading failed */
    return ts__read_try(s, L);
  /* A reader, the common wait, is anchored in the stream's user value: a
   * registry ref per read cost more than the rest of it. A woken reader
   * stays there: it is running then, and the next wait overwrites it. */
  lua_pushthread(L);
  lua_setiuservalue(L, 1, 1);
  if (s->rare != NULL)
    s->rare->read_due = due;
  s->reader = L;
  return ts__park(L);
}

void ts__read_forget(ts_stream *s, lua_State *co) {
  lua_State *L = s->loop->L;

  if (s->reader != co)
    return;
  s->reader = NULL;
  s->rmode = RD_NONE;
  s->scan = 0;
  ts__stream_push(L, s); /* the stream's anchor of its reader */
  lua_pushnil(L);
  lua_setiuservalue(L, -2, 1);
  lua_pop(L, 1);
  stop_timer(s);
  ts__read_update(s);
}

int ts__method_read_until(lua_State *L) {
  ts_stream *s = check_self(L);
  size_t dlen;
  const char *delim = luaL_checklstring(L, 2, &dlen);
  lua_Integer max = luaL_optinteger(L, 3, 0);

  luaL_argcheck(L, dlen > 0, 2, "empty delimiter");
  luaL_argcheck(L, dlen < UINT32_MAX, 2, "delimiter too long");
  luaL_argcheck(L, max >= 0, 3, "max_bytes must not be negative");
  if (s->reader == NULL) {
    s->delim = delim;
    s->dlen = (uint32_t)dlen;
    s->scan = 0;
    if (!lua_isnoneornil(L, 4)) { /* "keep": past max_bytes, the stream stays open */
      luaL_argcheck(
          L, lua_type(L, 4) == LUA_TSTRING && strcmp(lua_tostring(L, 4), "keep") == 0, 4,
          "\"keep\" or nil expected");
      luaL_argcheck(L, max > 0, 3, "\"keep\" needs max_bytes");
      s->flags |= F_KEEP_ON_LIMIT;
    } else {
      s->flags &= ~F_KEEP_ON_LIMIT;
    }
  }
  return read_request(L, s, RD_UNTIL, (size_t)max);
}

int ts__method_read_bytes(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  int partial = lua_toboolean(L, 3);

  luaL_argcheck(L, n >= 0, 2, "byte count must not be negative");
  if (n == 0 && s->reader == NULL) {
    lua_pushliteral(L, "");
    return 1;
  }
  return read_request(L, s, partial ? RD_PARTIAL : RD_BYTES, (size_t)n);
}

int ts__method_read_until_close(lua_State *L) {
  return read_request(L, check_self(L), RD_CLOSE, 0);
}

/* _fill(n) -> true once more than n bytes are buffered, or nil, err,
 * partial (the stream ended, or max_buffer_size) */
int ts__method_fill(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 0, 2, "byte count must not be negative");
  return read_request(L, s, RD_FILL, (size_t)n);
}

/* ---- for layers ---- */

/* Whether the read request can be answered from the buffer: a layer
 * stops decoding then, and the rest waits in it until the next request
 * (pump), so that what a request leaves unread stays under the mark. */
static int request_ready(ts_stream *s) {
  size_t len = ts_buf_len(&s->rbuf), scan = s->scan;

  switch (s->rmode) {
  case RD_UNTIL:
    if (ts_buf_find(&s->rbuf, s->delim, s->dlen, &scan) >= 0)
      return 1;
    s->scan = (uint32_t)scan;
    return s->rn > 0 && len >= s->rn; /* too large: it fails */
  case RD_BYTES: return len >= s->rn;
  case RD_PARTIAL: return len > 0;
  case RD_FILL: return len > s->rn;
  default: return 0; /* RD_CLOSE takes everything */
  }
}

char *ts__stream_read_space(ts_stream *s, size_t *room) {
  size_t len = ts_buf_len(&s->rbuf), r, limit;
  int err;

  if ((s->flags & F_CLOSED) || len >= s->max_buffer || request_ready(s))
    return NULL;
  limit = read_limit(s, len, s->chunk);
  limit = limit < s->max_buffer - len ? limit : s->max_buffer - len;
  if (limit == 0)
    return NULL;
  if (len == 0 && !(s->flags & F_BORROWED))
    borrow(s);
  else if ((s->flags & F_BORROWED) && ts_buf_room(&s->rbuf) == 0)
    unborrow(s);
  if (!(s->flags & F_BORROWED) &&
      (err = reserve(s, limit < s->chunk ? limit : s->chunk)) != 0) {
    reserve_failed(s, err);
    return NULL;
  }
  r = ts_buf_room(&s->rbuf);
  *room = r < limit ? r : limit;
  return ts_buf_tail(&s->rbuf);
}

int ts__stream_deliver(ts_stream *s, const char *data, size_t n) {
  int err;

  unborrow(s);
  if (n == 0 || (s->flags & F_CLOSED))
    return 0;
  if ((err = reserve(s, n)) != 0) {
    reserve_failed(s, err);
    return err;
  }
  memcpy(ts_buf_tail(&s->rbuf), data, n);
  ts__stream_read_commit(s, n);
  return 0;
}

void ts__stream_read_commit(ts_stream *s, size_t n) {
  count_in(s, n);
  s->rbuf.end += (uint32_t)n;
}
