/* IOStream over uv_tcp_t / uv_pipe_t: read requests served from one
 * buffer, a write buffer flushed once per wake-up, and an explicit close.
 * Bytes pass through a layer (ts_layer_ops) when one is attached.
 *
 * Reads: while a stream has nothing buffered, libuv reads into the loop's
 * shared buffer; a request that the new bytes satisfy is answered straight
 * from there and only the remainder is copied into the stream's own buffer.
 * An idle connection therefore holds no read buffer. */
#include "stream.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The shared read buffer that idle streams borrow. */
#define SHARED_READ_SIZE (64 * 1024)
#define WRITE_HIGH_WATER (1024 * 1024)
#define DIRECT_WRITE_MIN (16 * 1024) /* see write_direct */
/* Unsent bytes a stream may hold: a uv_buf_t's length is an unsigned int
 * and a write's result an int. */
#define MAX_PENDING ((size_t)INT_MAX)
#define LINGER_MS 10000
/* Reading pauses past this many read_chunk_size of unread bytes. */
#define READ_HIGH_WATER_CHUNKS 4

/* What the streams of one loop share. */
typedef struct stream_ctx {
  ts_loop *loop;
  ts_stream **dirty;   /* streams with unflushed writes (a stack: a */
  size_t ndirty, cap;  /* pointer per stream costs idle ones bytes) */
  ts_stream *borrower; /* the stream whose rbuf is `shared` right now */
  ts_stream *yielding; /* its task ran on a full read: no more this turn */
  unsigned wakes;      /* readers woken so far (they ran Lua code) */
  size_t reading;      /* streams with uv_read_start active */
  ts_buf_pool wpool;   /* drained write buffers */
  size_t rbuf_bytes;   /* held by streams' own read buffers */
  size_t rbuf_count;   /* streams holding one */
  size_t rbuf_budget;  /* the most rbuf_bytes should reach */
  char shared[SHARED_READ_SIZE];
} stream_ctx;

/* A write the kernel did not take at once: the request and its bytes. */
typedef struct write_req {
  uv_write_t req;
  ts_buf buf;
} write_req;

/* Tasks waiting in write() or flush(), in the order they wrote: each wakes
 * once the bytes up to `until` (a count since the stream opened) are sent. */
typedef struct write_waiter {
  ts_waiter w;
  uint64_t until;
  uint64_t start; /* loop time (ms) its wait began, or NO_LIMIT */
} write_waiter;

/* What few streams need, made on first use (an idle stream is counted
 * in bytes): the wait timer, the writers waiting, a close callback and a
 * timeout. Freed when the handle closes. */
typedef struct stream_rare {
  uv_timer_t *timer; /* wait timeouts and close linger; lazy */
  int n, cap;        /* the writers */
  write_waiter *w;
  uint64_t sent_at_close; /* bytes_sent when the stream closed */
  int close_cb_ref;
  float timeout;       /* seconds; 0 means none */
  uint64_t read_start; /* loop time (ms) the reader's wait began, or NO_LIMIT */
} stream_rare;

/* The start of a wait that began with no timeout set: it has none. */
#define NO_LIMIT UINT64_MAX

enum { RD_NONE, RD_UNTIL, RD_BYTES, RD_PARTIAL, RD_CLOSE, RD_FILL };

enum {
  F_PIPE = 1 << 0,
  F_READING = 1 << 1,    /* uv_read_start is active */
  F_EOF = 1 << 2,        /* the peer finished sending */
  F_CLOSED = 1 << 3,     /* close() was called or an error ended it */
  F_HCLOSING = 1 << 4,   /* uv_close was called */
  F_DONE = 1 << 5,       /* the close callback ran */
  F_DIRTY = 1 << 6,      /* on the dirty list */
  F_BORROWED = 1 << 7,   /* rbuf points into the shared buffer */
  F_OVERBUDGET = 1 << 8, /* the read budget refused its buffer */
  F_OWNED = 1 << 9       /* pinned past close_cb until disowned */
};

/* Every byte here is paid by each idle connection: what few streams use
 * is in `rare`, and sizes are 32 bits (buffers stay under 4 GiB). */
struct ts_stream {
  ts_loop *loop; /* first: a task serving the stream is owned by it */
  ts_buf rbuf;
  ts_buf wbuf;             /* filled by write() */
  write_req *inflight;     /* the uv_write under way, with its bytes */
  lua_State *reader;       /* a task waiting to read: held by the user value */
  stream_rare *rare;       /* or NULL */
  uint64_t wtotal;         /* bytes ever passed to write() */
  const ts_layer_ops *ops; /* the layer, or NULL */
  ts_counters *counters;   /* its listener's, or NULL */
  void *layer;
  const char *delim; /* lives on the waiting task's stack */
  int self_ref;
  int err;                    /* the libuv error that ended the stream */
  uint32_t rn;                /* read_bytes count or read_until max_bytes */
  uint32_t dlen, scan;        /* the delimiter; how far it was looked for */
  uint32_t max_buffer, chunk; /* < 4 GiB: see init.lua */
  uint16_t flags;
  uint8_t rmode;
  /* Last, so that a TCP stream is allocated without a pipe's extra bytes
   * (see STREAM_SIZE): idle connections are counted in bytes. */
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } h;
};

#define STREAM_SIZE(is_pipe)                                                             \
  (offsetof(ts_stream, h) + ((is_pipe) ? sizeof(uv_pipe_t) : sizeof(uv_tcp_t)))

static void stream_close(ts_stream *s, int err);

static stream_ctx *sctx(ts_stream *s) {
  return s->loop->streams;
}
static void update_reading(ts_stream *s);
static void check_writers(ts_stream *s);

/* Runs on every read and write: a userdata of our size whose handle
 * points back at it is a stream (luaL_checkudata's lookup of the metatable
 * by name cost a third of the echo path). Anything else gets
 * luaL_checkudata's error. */
ts_stream *ts__check_stream(lua_State *L, int idx) {
  ts_stream *s = lua_touserdata(L, idx);
  size_t size = s != NULL ? lua_rawlen(L, idx) : 0;

  if ((size != STREAM_SIZE(0) && size != STREAM_SIZE(1)) || s->h.handle.data != s)
    return luaL_checkudata(L, idx, TS_STREAM_MT);
  return s;
}

#define check_self(L) ts__check_stream(L, 1)

uv_stream_t *ts__stream_handle(ts_stream *s) {
  return &s->h.stream;
}

ts_loop *ts__stream_loop(ts_stream *s) {
  return s->loop;
}

/* The rare part, made if need be; NULL once the handle closed, or when
 * out of memory (then the stream does without). */
static stream_rare *rare(ts_stream *s) {
  stream_rare *r = s->rare;

  if (r != NULL || (s->flags & F_DONE))
    return r;
  r = s->rare = calloc(1, sizeof(*r));
  if (r != NULL) {
    r->close_cb_ref = LUA_NOREF;
    r->read_start = NO_LIMIT;
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

static void set_timeout(ts_stream *s, double seconds) {
  int on = ts__timeout_ms(seconds) > 0;
  stream_rare *r = on ? rare(s) : s->rare;

  if (r != NULL)
    r->timeout = on ? (float)seconds : 0;
}

/* Reading goes on while fewer bytes than this wait unread. */
static size_t read_high_water(ts_stream *s) {
  size_t mark = READ_HIGH_WATER_CHUNKS * (size_t)s->chunk;
  return mark < s->max_buffer ? mark : s->max_buffer;
}

double ts__stream_timeout(ts_stream *s) {
  return s->rare != NULL ? s->rare->timeout : 0;
}

int ts__stream_closed(ts_stream *s) {
  return (s->flags & F_CLOSED) != 0;
}

static ts_buf *layer_output(ts_stream *s) {
  return s->ops != NULL && s->ops->output != NULL ? s->ops->output(s->layer) : NULL;
}

static size_t pending_writes(ts_stream *s) {
  ts_buf *out = layer_output(s);

  return ts_buf_len(&s->wbuf) + (out != NULL ? ts_buf_len(out) : 0) +
         (s->inflight != NULL ? ts_buf_len(&s->inflight->buf) : 0);
}

const char *ts__stream_error(ts_stream *s) {
  const char *why =
      s->ops != NULL && s->ops->error != NULL ? s->ops->error(s->layer) : NULL;
  return why != NULL ? why : ts__errname(s->err);
}

static int push_error(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* ---- the owner ---- */

/* After the close callback, and the owner's end if it has one. */
static void unpin(lua_State *L, ts_stream *s) {
  ts__counters_release(L, s->counters);
  s->counters = NULL;
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

/* ---- counters ---- */

ts_counters *ts__counters_new(void) {
  ts_counters *c = calloc(1, sizeof(*c));
  if (c != NULL) {
    c->refs = 1;
    c->owner_ref = LUA_NOREF;
  }
  return c;
}

void ts__counters_release(lua_State *L, ts_counters *c) {
  if (c == NULL || --c->refs > 0)
    return;
  luaL_unref(L, LUA_REGISTRYINDEX, c->owner_ref);
  free(c);
}

/* Once, on a new stream. */
void ts__stream_count_into(ts_stream *s, ts_counters *c) {
  if (c != NULL)
    c->refs++;
  s->counters = c;
}

ts_counters *ts__stream_counters(ts_stream *s) {
  return s->counters;
}

static void count_in(ts_stream *s, size_t n) {
  if (s->counters != NULL)
    s->counters->bytes_in += n;
}

static void count_out(ts_stream *s, size_t n) {
  s->wtotal += n;
  if (s->counters != NULL)
    s->counters->bytes_out += n;
}

/* ---- the wait timer ---- */

static void wait_timer_cb(uv_timer_t *t);

static void start_timer(ts_stream *s, uint64_t ms) {
  stream_rare *r = rare(s);

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

/* A wait begins; *start is when (NO_LIMIT without a timeout). Each wait
 * has its own start: a reader and writers wait at once. A timer still
 * armed from an earlier wait is kept if it fires no later than this one
 * ends: the callback then arms it for the rest. Restarting it per wait
 * cost two timer-heap operations per request (a read per request, a stop
 * per wake). */
static void start_wait_timer(ts_stream *s, uint64_t *start) {
  stream_rare *r = s->rare;
  uint64_t ms;

  *start = NO_LIMIT;
  if (r == NULL || r->timeout <= 0)
    return;
  ms = ts__timeout_ms(r->timeout);
  *start = uv_now(s->h.handle.loop);
  if (r->timer != NULL && uv_is_active((uv_handle_t *)r->timer) &&
      uv_timer_get_due_in(r->timer) <= ms)
    uv_ref((uv_handle_t *)r->timer);
  else
    start_timer(s, ms);
}

static int writing(ts_stream *s) {
  return s->rare != NULL && s->rare->n > 0;
}

/* No one waits: the timer may stay armed (the next wait will likely keep
 * it, see start_wait_timer) but no longer keeps the loop running. */
static void stop_timer(ts_stream *s) {
  if (s->rare != NULL && s->rare->timer != NULL && s->reader == NULL && !writing(s) &&
      !(s->flags & F_CLOSED))
    uv_unref((uv_handle_t *)s->rare->timer);
}

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

static void free_rbuf(ts_stream *s) {
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
  stream_close(s, UV_E2BIG);
}

static void reserve_failed(ts_stream *s, int err) {
  if (err == UV_E2BIG)
    refuse_growth(s);
  else
    stream_close(s, err);
}

/* A quarter of the memory this process may use (its cgroup's limit, if
 * lower than the machine's). */
static size_t default_read_budget(void) {
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
  free_rbuf(s);
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

static int read_failed(ts_stream *s, lua_State *L, const char *err) {
  s->rmode = RD_NONE;
  s->scan = 0;
  return push_error(L, err);
}

static int fail_too_large(ts_stream *s, lua_State *L) {
  read_failed(s, L, "too large");
  stream_close(s, 0);
  return 2;
}

/* The peer is gone: hand over what is left as the partial result. */
static int fail_closed(ts_stream *s, lua_State *L) {
  read_failed(s, L, ts__stream_error(s));
  lua_pushlstring(L, ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf));
  ts_buf_consume(&s->rbuf, ts_buf_len(&s->rbuf));
  stream_close(s, 0);
  return 3;
}

/* Answers the pending read request if it can: returns the number of values
 * pushed on L (a result or an error), or 0 if it must wait for more. */
static int try_read(ts_stream *s, lua_State *L) {
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
      stream_close(s, 0);
      return 1;
    }
    if (len >= s->max_buffer)
      return fail_too_large(s, L);
    break;
  }
  return ended ? fail_closed(s, L) : 0;
}

static void wake_reader(ts_stream *s, int nres) {
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
    free_rbuf(s);
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

  if (s->reader != NULL && (n = try_read(s, s->reader)) > 0)
    wake_reader(s, n);
  unborrow(s);
  update_reading(s);
}

/* The peer ended, nobody reads and nothing is left to read. A server's
 * stream stays open while its handler runs: the peer may have shut down
 * only its sending half, a reply written after a pause must still go, and
 * the handler's end closes it (or its next read, which gets the end).
 * Other streams close now: a client stream or a pipe nobody closes would
 * keep its descriptor. So does one with a close callback: its owner asked
 * to hear of the end at once, as in Tornado. */
static void close_if_ended(ts_stream *s) {
  if ((s->flags & (F_EOF | F_CLOSED)) != F_EOF || s->reader != NULL ||
      ts_buf_len(&s->rbuf) != 0)
    return;
  if (!(s->flags & F_OWNED) || (s->rare != NULL && s->rare->close_cb_ref != LUA_NOREF))
    stream_close(s, 0);
}

static void on_eof(ts_stream *s) {
  s->flags |= F_EOF;
  if (s->reader != NULL)
    wake_reader(s, try_read(s, s->reader));
  close_if_ended(s);
  /* What nobody read yet must leave the shared buffer: the next read of
   * any stream overwrites it. */
  unborrow(s);
  update_reading(s);
}

/* A layer's bytes in: it may also have flushed what a writer waits for
 * (a TLS handshake releases what was written before it). */
void ts__stream_on_data(ts_stream *s) {
  on_data(s);
  check_writers(s);
}

void ts__stream_on_eof(ts_stream *s) {
  on_eof(s);
  check_writers(s);
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
    update_reading(s);
  } else if (nread < 0) {
    if (ops != NULL && ops->on_error != NULL)
      ops->on_error(s, s->layer, (int)nread);
    stream_close(s, (int)nread);
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

static void update_reading(ts_stream *s) {
  /* A layer's own bytes (a PROXY header, TLS records) are not in rbuf: it
   * reads until what it decoded reaches the mark, as a plain stream. */
  int want = !(s->flags & (F_EOF | F_CLOSED)) &&
             (s->reader != NULL || ts_buf_len(&s->rbuf) < read_high_water(s));
  int err;

  if (want && !(s->flags & F_READING)) {
    err = uv_read_start(&s->h.stream, alloc_cb, read_cb);
    if (err != 0) {
      stream_close(s, err);
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
  int r, lent;

  if (s->reader != NULL)
    return luaL_error(L, "already reading");
  s->rmode = mode;
  s->rn = (uint32_t)(n < UINT32_MAX ? n : UINT32_MAX); /* max_buffer is less */
  lent = (s->flags & F_BORROWED) != 0;                 /* by on_data, which wakes us */
  if (s->ops != NULL && s->ops->pump != NULL)          /* what it held back */
    s->ops->pump(s, s->layer);
  r = try_read(s, L);
  if (!lent)
    unborrow(s);
  if (r > 0) {
    if (s->flags & F_EOF) /* it read what was left */
      close_if_ended(s);
    update_reading(s);
    return r;
  }
  if (!ts__can_wait(L)) {
    s->rmode = RD_NONE;
    ts__check_task(L, "read");
  }
  s->reader = L; /* a reader reads past the high-water mark */
  update_reading(s);
  s->reader = NULL;
  if (s->flags & F_CLOSED) /* update_reading failed */
    return try_read(s, L);
  /* A reader, the common wait, is anchored in the stream's user value: a
   * registry ref per read cost more than the rest of it. A woken reader
   * stays there: it is running then, and the next wait overwrites it. */
  lua_pushthread(L);
  lua_setiuservalue(L, 1, 1);
  if (s->rare != NULL)
    start_wait_timer(s, &s->rare->read_start);
  s->reader = L;
  return ts__park(L);
}

static int l_read_until(lua_State *L) {
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
  }
  return read_request(L, s, RD_UNTIL, (size_t)max);
}

static int l_read_bytes(lua_State *L) {
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

static int l_read_until_close(lua_State *L) {
  return read_request(L, check_self(L), RD_CLOSE, 0);
}

/* _buffered() -> the unread bytes, left in place (read_until_pattern) */
static int l_buffered(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_pushlstring(L, ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf));
  return 1;
}

/* _fill(n) -> true once more than n bytes are buffered, or nil, err,
 * partial (the stream ended, or max_buffer_size) */
static int l_fill(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  luaL_argcheck(L, n >= 0, 2, "byte count must not be negative");
  return read_request(L, s, RD_FILL, (size_t)n);
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

ts_buf *ts__stream_plain(ts_stream *s) {
  return &s->wbuf;
}

/* ---- writing ---- */

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
  stream_close(s, n);
  return n;
}

/* Bytes of write() handed to the kernel so far. With a layer the pending
 * bytes are partly its output, so this may lag: never early. */
static uint64_t bytes_sent(ts_stream *s) {
  size_t left = pending_writes(s);

  if ((s->flags & F_CLOSED) && s->rare != NULL)
    return s->rare->sent_at_close; /* the buffers go before close_cb */
  return left < s->wtotal ? s->wtotal - left : 0;
}

/* Queues the task L to wake once `until` bytes are sent. */
static int wait_written(lua_State *L, ts_stream *s, uint64_t until) {
  stream_rare *q = rare(s);
  write_waiter *w;

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
  ts_waiter_init(&w->w);
  start_wait_timer(s, &w->start);
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
    if (err != NULL || bytes_sent(s) >= s->rare->w[i].until) {
      wake_writer(s, i, err);
      i = 0;
    } else {
      i++;
    }
  }
}

/* Once closed, writers whose bytes were not sent by then fail, as in
 * Tornado: a close does not wait for a peer that stopped reading. */
static void check_writers(ts_stream *s) {
  if (!writing(s))
    return;
  wake_writers(s, NULL);
  if (s->flags & F_CLOSED)
    wake_writers(s, ts__stream_error(s));
}

static void handle_close(ts_stream *s);

static void write_cb(uv_write_t *req, int status) {
  ts_stream *s = req->data;
  write_req *w = (write_req *)req;

  if (status < 0 && status != UV_ECANCELED)
    stream_close(s, status); /* with these bytes still counted unsent */
  ts_buf_release(&w->buf, &sctx(s)->wpool);
  free(w);
  s->inflight = NULL;
  if (status < 0)
    return;
  if (ts__stream_flush(s) != 0)
    return;
  if ((s->flags & F_CLOSED) && pending_writes(s) == 0)
    handle_close(s);
  else
    check_writers(s);
}

static void mark_dirty(ts_stream *s) {
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
static void flush_dirty(ts_loop *loop) {
  stream_ctx *ctx = loop->streams;
  ts_stream *s;

  while (ctx->ndirty > 0) {
    s = ctx->dirty[--ctx->ndirty];
    s->flags &= ~F_DIRTY;
    ts__stream_flush(s);
    if (s->flags & F_CLOSED) /* writers closed on (see stream_close) */
      check_writers(s);
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

/* write({...}): the strings of an array, in order, all or none: a bad
 * item or a batch past MAX_PENDING is refused before anything is queued
 * (a reply half queued would answer the next request), so the items are
 * looked at twice; the second look finds them in the array part. */
static int append_array(lua_State *L, ts_stream *s, size_t *pending) {
  size_t len, total = *pending, before = ts_buf_len(&s->wbuf);
  lua_Integer i, n;
  const char *p;

  luaL_argexpected(L, lua_type(L, 2) == LUA_TTABLE, 2, "string or array of strings");
  n = luaL_len(L, 2);
  for (i = 1; i <= n; i++) {
    if (lua_geti(L, 2, i) != LUA_TSTRING)
      return luaL_error(L, "bad argument #1 to 'write' (item %d is not a string)",
                        (int)i);
    if (over_pending(&total, lua_rawlen(L, -1)))
      return UV_E2BIG;
    lua_pop(L, 1);
  }
  for (i = 1; i <= n; i++) {
    lua_geti(L, 2, i);
    p = lua_tolstring(L, -1, &len);
    if (ts_buf_append(&s->wbuf, p, len) != 0) {
      s->wbuf.end = s->wbuf.start + (uint32_t)before; /* appends only added */
      return UV_ENOMEM;
    }
    lua_pop(L, 1);
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
    stream_close(s, n);
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

static int l_write(lua_State *L) {
  ts_stream *s = check_self(L);
  size_t pending;
  int rc;

  if (s->flags & F_CLOSED) {
    luaL_checkany(L, 2);
    return push_error(L, ts__stream_error(s));
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
    mark_dirty(s);
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

static int l_flush(lua_State *L) {
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

/* ---- closing ---- */

static void timer_free(uv_handle_t *h) {
  free(h);
}

static void unlink_dirty(ts_stream *s) {
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

/* libuv is done with the handle: wake every waiter, run the close
 * callback, and unpin (a task still running on the stream keeps it). */
static void close_cb(uv_handle_t *h) {
  ts_stream *s = h->data;
  stream_ctx *ctx = sctx(s);
  lua_State *L = ctx->loop->L;

  ts__stream_push(L, s); /* held here: a task that ends may disown it */
  if (s->flags & F_DIRTY)
    unlink_dirty(s);
  if (ctx->yielding == s) /* a new stream may come at this address */
    ctx->yielding = NULL;
  ts_buf_release(&s->wbuf, &ctx->wpool);
  s->flags |= F_DONE;
  if (s->ops != NULL && s->ops->closed != NULL)
    s->ops->closed(s, s->layer);
  if (s->reader != NULL)
    wake_reader(s, try_read(s, s->reader));
  if (s->reader == NULL) {       /* an ended task must not stay */
    lua_pushnil(L);              /* anchored in an open-ended */
    lua_setiuservalue(L, -2, 1); /* stream (the collector would */
  }                              /* walk it again and again) */
  if (ts_buf_len(&s->rbuf) == 0 && !(s->flags & F_BORROWED))
    free_rbuf(s); /* out of the read budget now */
  check_writers(s);
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

static void handle_close(ts_stream *s) {
  if (s->flags & F_HCLOSING)
    return;
  s->flags |= F_HCLOSING;
  if (s->rare != NULL && s->rare->timer != NULL) {
    uv_close((uv_handle_t *)s->rare->timer, timer_free);
    s->rare->timer = NULL;
  }
  uv_close(&s->h.handle, close_cb);
}

/* Ends the stream. A clean close (err 0) first hands what is written to the
 * kernel, for at most LINGER_MS; an error drops it. */
static void stream_close(ts_stream *s, int err) {
  if (s->flags & F_CLOSED) {
    if (err != 0 && !(s->flags & F_HCLOSING))
      handle_close(s);
    return;
  }
  if (writing(s)) {
    /* Their fate is told after the current task or callback (the dirty
     * list): close() may run inside a task, which must not resume others. */
    s->rare->sent_at_close = bytes_sent(s);
    mark_dirty(s);
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
  if (s->flags & F_READING) {
    uv_read_stop(&s->h.stream);
    set_reading(s, 0);
  }
  if (err == 0 && s->ops != NULL && s->ops->shutdown != NULL)
    s->ops->shutdown(s, s->layer);
  if (err == 0 && ts__stream_flush(s) != 0)
    return;
  if (err != 0 || pending_writes(s) == 0)
    handle_close(s);
  else
    start_timer(s, LINGER_MS);
}

void ts__stream_close(ts_stream *s, int err) {
  stream_close(s, err);
}

void ts__stream_fail(ts_stream *s, int err) {
  if (s->flags & F_CLOSED)
    return;
  s->err = err;
  stream_close(s, 0); /* sends what the layer queued (an alert), then closes */
}

/* Closes at once, dropping unwritten data (used when a server stops). */
void ts__stream_abort(ts_stream *s) {
  stream_close(s, UV_ECANCELED);
}

/* Whether a wait that began at `start` has run out at `now`; if not,
 * what it has left goes to *next when that is sooner. */
static int expired(uint64_t start, uint64_t now, uint64_t ms, uint64_t *next) {
  if (start == NO_LIMIT)
    return 0;
  if (now - start >= ms)
    return 1;
  if (start + ms - now < *next)
    *next = start + ms - now;
  return 0;
}

static void wait_timer_cb(uv_timer_t *t) {
  ts_stream *s = t->data;
  stream_rare *r = s->rare;
  lua_State *reader = s->reader;
  uint64_t ms, now = uv_now(t->loop), next = NO_LIMIT;
  int i;

  if (s->flags & F_CLOSED) { /* the linger ran out */
    handle_close(s);
    return;
  }
  if ((reader == NULL && !writing(s)) || r->timeout <= 0)
    return; /* armed for a wait that is over, or timeouts are off now */
  ms = ts__timeout_ms(r->timeout);
  /* Each wait by its own start: one that goes on (a reader while writers
   * come and go) must not be put off by the others. A woken task may
   * wait again at once: that wait starts now, so it has not run out. */
  for (i = 0; writing(s) && i < r->n;) {
    if (expired(r->w[i].start, now, ms, &next))
      wake_writer(s, i, "timeout");
    else
      i++;
  }
  if (reader != NULL && s->reader == reader && expired(r->read_start, now, ms, &next)) {
    read_failed(s, reader, "timeout");
    wake_reader(s, 2);
    update_reading(s); /* not for a write-only pipe: it cannot read */
  }
  if (next != NO_LIMIT && !(s->flags & F_CLOSED) &&
      (!uv_is_active((uv_handle_t *)t) || uv_timer_get_due_in(t) > next))
    uv_timer_start(t, wait_timer_cb, next, 0);
}

static int l_close(lua_State *L) {
  ts_stream *s = luaL_checkudata(L, 1, TS_STREAM_MT);
  if (!(s->flags & F_DONE) && s->self_ref != LUA_NOREF)
    stream_close(s, 0);
  return 0;
}

static int l_gc(lua_State *L) {
  ts_stream *s = luaL_checkudata(L, 1, TS_STREAM_MT);
  /* A stream is pinned until its close callback, so here libuv is done. */
  if (!(s->flags & F_BORROWED))
    free_rbuf(s);
  if (s->ops != NULL && s->ops->free != NULL)
    s->ops->free(L, s->layer);
  s->ops = NULL;
  if (s->rare != NULL) /* close_cb never ran (lua_close) */
    free_rare(s);
  ts__counters_release(L, s->counters); /* if close_cb never ran (lua_close) */
  s->counters = NULL;
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
  if ((r = rare(s)) == NULL)
    return luaL_error(L, "set_close_callback: out of memory");
  luaL_unref(L, LUA_REGISTRYINDEX, r->close_cb_ref);
  r->close_cb_ref = lua_isnil(L, 2) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
  close_if_ended(s); /* the end came before the callback did */
  return 0;
}

/* ---- options and addresses ---- */

static int l_settimeout(lua_State *L) {
  ts_stream *s = check_self(L);
  lua_Number t = luaL_optnumber(L, 2, 0);
  luaL_argcheck(L, t >= 0, 2, "set_timeout: seconds must be 0 or more"); /* NaN is not */
  set_timeout(s, t);
  return 0;
}

static int l_set_nodelay(lua_State *L) {
  ts_stream *s = check_self(L);
  int on = lua_isnone(L, 2) || lua_toboolean(L, 2);
  if (!(s->flags & (F_PIPE | F_HCLOSING)))
    uv_tcp_nodelay(&s->h.tcp, on);
  return 0;
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
static stream_ctx *ctx_of(lua_State *L);

static int l_read_budget(lua_State *L) {
  stream_ctx *ctx = ctx_of(L);

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
static stream_ctx *ctx_of(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  stream_ctx *ctx = loop->streams;

  if (ctx != NULL)
    return ctx;
  ctx = calloc(1, sizeof(*ctx));
  if (ctx == NULL)
    luaL_error(L, "tcpserver: out of memory");
  ctx->loop = loop;
  ctx->rbuf_budget = default_read_budget();
  loop->streams = ctx;
  ts__loop_on_settle(loop, flush_dirty);
  ts__loop_on_close(loop, free_ctx);
  return ctx;
}

void ts__stream_configure(ts_stream *s, size_t max_buffer, size_t chunk, double timeout) {
  s->max_buffer = (uint32_t)(max_buffer < UINT32_MAX ? max_buffer : UINT32_MAX);
  s->chunk = (uint32_t)(chunk < s->max_buffer ? chunk : s->max_buffer);
  set_timeout(s, timeout);
}

ts_stream *ts__stream_new(lua_State *L, int is_pipe) {
  stream_ctx *ctx = ctx_of(L);
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
  update_reading(s);
  return (s->flags & F_CLOSED) ? s->err : 0;
}

void ts__stream_push(lua_State *L, ts_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
}

int ts__open_stream(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"read_until", l_read_until},
      {"read_bytes", l_read_bytes},
      {"read_until_close", l_read_until_close},
      {"_buffered", l_buffered},
      {"_fill", l_fill},
      {"write", l_write},
      {"flush", l_flush},
      {"close", l_close},
      {"closed", l_closed},
      {"set_close_callback", l_set_close_callback},
      {"set_timeout", l_settimeout},
      {"settimeout", l_settimeout}, /* LuaSocket's and OpenResty's name */
      {"set_nodelay", l_set_nodelay},
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
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_setfield(L, -2, "stream_mt"); /* exported: the Lua layer adds methods */
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
