/* What the stream's files share (as libuv's src/unix/internal.h): its
 * layout, the loop's stream context and the functions one part of the
 * stream calls in another. Only stream*.c include it; every other file
 * sees a stream through stream.h.
 *
 *   stream.c        the lifecycle: creation, owner, wait timer, layers,
 *                   closing, collection
 *   stream_read.c   the read budget, the shared read buffer, read requests
 *                   and the read methods
 *   stream_write.c  the write buffer, flushing, the dirty list, writers
 *                   and the write methods
 *   stream_lua.c    the method table (others add to it with
 *                   ts__stream_methods) and the methods that are not on
 *                   the hot path
 *
 * The read and write methods stay beside their mechanism: their static
 * helpers inline into them (one message's read or write is a few hundred
 * instructions, and a call across files is not free). */
#ifndef TS_STREAM_INT_H
#define TS_STREAM_INT_H

#include "stream.h"

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

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
  uint64_t due; /* loop time (ms) its wait runs out, or NO_LIMIT */
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
  float timeout;     /* a read's, in seconds; 0 means none */
  float wtimeout;    /* a write's (settimeouts): the same unless set apart */
  uint64_t read_due; /* loop time (ms) the reader's wait runs out, or NO_LIMIT */
} stream_rare;

/* The due time of a wait without a limit. */
#define NO_LIMIT UINT64_MAX

enum { RD_NONE, RD_UNTIL, RD_BYTES, RD_PARTIAL, RD_CLOSE, RD_FILL };

enum {
  F_PIPE = 1 << 0,
  F_READING = 1 << 1,        /* uv_read_start is active */
  F_EOF = 1 << 2,            /* the peer finished sending */
  F_CLOSED = 1 << 3,         /* close() was called or an error ended it */
  F_HCLOSING = 1 << 4,       /* uv_close was called */
  F_DONE = 1 << 5,           /* the close callback ran */
  F_DIRTY = 1 << 6,          /* on the dirty list */
  F_BORROWED = 1 << 7,       /* rbuf points into the shared buffer */
  F_OVERBUDGET = 1 << 8,     /* the read budget refused its buffer */
  F_OWNED = 1 << 9,          /* pinned past close_cb until disowned */
  F_KEEP_OPEN = 1 << 10,     /* stays open at the peer's end (ts__stream_keep_open) */
  F_KEEP_ON_LIMIT = 1 << 11, /* this read_until past max_bytes keeps it open */
  F_SHUT_WR = 1 << 12,       /* shutdown("send"): no more writes */
  F_SHUT_QUEUED = 1 << 13,   /* the FIN waits for the writes to drain */
  F_HALF_OPEN = 1 << 14      /* set_half_open: the peer's end leaves it open */
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
  ts_tally *tally;         /* its owner's, or NULL */
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

/* Layout rules that code elsewhere relies on. */
_Static_assert(offsetof(ts_stream, loop) == 0,
               "ts__stream_own hands out &s->loop as the owner, and "
               "ts__stream_of_owner casts it back");
_Static_assert(offsetof(ts_stream, h) + sizeof(((ts_stream *)0)->h) == sizeof(ts_stream),
               "STREAM_SIZE allocates a TCP stream without a pipe's extra bytes: "
               "the handle must be last");
_Static_assert(offsetof(uv_tcp_t, data) == offsetof(uv_handle_t, data) &&
                   offsetof(uv_pipe_t, data) == offsetof(uv_handle_t, data) &&
                   offsetof(uv_tcp_t, type) == offsetof(uv_handle_t, type) &&
                   offsetof(uv_pipe_t, type) == offsetof(uv_handle_t, type),
               "ts__stream_each and ts__check_stream spot a stream by its "
               "handle's type and data, read through uv_handle_t");

static inline stream_ctx *sctx(ts_stream *s) {
  return s->loop->streams;
}

/* Runs on every read and write: a userdata of a stream's size whose
 * handle points back at it is a stream. Only C code could make another
 * userdata pass (Lua cannot write a pointer into one). The exact check,
 * comparing the metatable with one each method holds as an upvalue (as
 * cqueues does), cost 119 more instructions per call (callgrind: 275 ->
 * 394 for stream:closed()), about 13% of an echoed message. */
static inline ts_stream *check_self(lua_State *L) {
  ts_stream *s = lua_touserdata(L, 1);
  size_t size = s != NULL ? lua_rawlen(L, 1) : 0;

  if ((size != STREAM_SIZE(0) && size != STREAM_SIZE(1)) || s->h.handle.data != s)
    return luaL_checkudata(L, 1, TS_STREAM_MT);
  return s;
}

/* Reading goes on while fewer bytes than this wait unread. */
static inline size_t read_high_water(ts_stream *s) {
  size_t mark = READ_HIGH_WATER_CHUNKS * (size_t)s->chunk;
  return mark < s->max_buffer ? mark : s->max_buffer;
}

static inline ts_buf *layer_output(ts_stream *s) {
  return s->ops != NULL && s->ops->output != NULL ? s->ops->output(s->layer) : NULL;
}

static inline size_t pending_writes(ts_stream *s) {
  ts_buf *out = layer_output(s);

  return ts_buf_len(&s->wbuf) + (out != NULL ? ts_buf_len(out) : 0) +
         (s->inflight != NULL ? ts_buf_len(&s->inflight->buf) : 0);
}

static inline int push_error(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static inline int writing(ts_stream *s) {
  return s->rare != NULL && s->rare->n > 0;
}

/* No one waits: the timer may stay armed (the next wait will likely keep
 * it, see ts__stream_start_wait) but no longer keeps the loop running. */
static inline void stop_timer(ts_stream *s) {
  if (s->rare != NULL && s->rare->timer != NULL && s->reader == NULL && !writing(s) &&
      !(s->flags & F_CLOSED))
    uv_unref((uv_handle_t *)s->rare->timer);
}

static inline void count_in(ts_stream *s, size_t n) {
  if (s->tally != NULL)
    s->tally->bytes_in += n;
}

static inline void count_out(ts_stream *s, size_t n) {
  s->wtotal += n;
  if (s->tally != NULL)
    s->tally->bytes_out += n;
}

/* stream.c: the lifecycle */
stream_rare *ts__stream_rare(ts_stream *s); /* made if need be; NULL if not */
void ts__stream_set_timeout(ts_stream *s, double seconds); /* reads and writes */
void ts__stream_set_timeouts(ts_stream *s, double read, double send);
/* Task L begins a wait: *due is when it runs out (NO_LIMIT: never), by the
 * stream's timeout or L's deadline; -1 if that deadline has passed. */
int ts__stream_start_wait(ts_stream *s, lua_State *L, int write, uint64_t *due);
void ts__stream_handle_close(ts_stream *s); /* uv_close, once */
stream_ctx *ts__stream_ctx(lua_State *L);   /* the loop's, made with its first stream */
void ts__stream_collect(lua_State *L, ts_stream *s);                  /* __gc */
int ts__stream_shutdown(lua_State *L, ts_stream *s, const char *how); /* the method */
void ts__stream_send_fin(ts_stream *s); /* shutdown("send")'s FIN, once writes drained */

/* stream_read.c */
void ts__read_update(ts_stream *s); /* starts or stops reading as needed */
void ts__read_stop(ts_stream *s);   /* reading stops for good */
int ts__read_try(ts_stream *s, lua_State *L);
void ts__read_wake(ts_stream *s, int nres);
int ts__read_failed(ts_stream *s, lua_State *L, const char *err);
void ts__read_free_buf(ts_stream *s);
void ts__read_close_if_ended(ts_stream *s);
size_t ts__read_default_budget(void);
int ts__method_read_until(lua_State *L);
int ts__method_read_bytes(lua_State *L);
int ts__method_read_until_close(lua_State *L);
int ts__method_fill(lua_State *L);
void ts__read_forget(ts_stream *s, lua_State *co); /* a killed task stops reading */

/* stream_write.c */
void ts__write_check(ts_stream *s); /* wakes the writers whose bytes are sent */
void ts__write_mark_dirty(ts_stream *s);
void ts__write_unlink_dirty(ts_stream *s);
void ts__write_flush_dirty(ts_loop *loop); /* the loop's settle hook */
uint64_t ts__write_sent(ts_stream *s);
/* Wakes with "timeout" the writers whose wait is due by `now`; the sooner
 * of *next and what the others have left goes to *next. */
void ts__write_timeouts(ts_stream *s, uint64_t now, uint64_t *next);
/* A killed task's writes stop waiting. */
void ts__write_forget(ts_stream *s, lua_State *co);
int ts__method_write(lua_State *L);
int ts__method_flush(lua_State *L);

/* Whether a wait due at `due` has run out at `now`; if not, what it has
 * left goes to *next when that is sooner. */
static inline int ts__wait_expired(uint64_t due, uint64_t now, uint64_t *next) {
  if (due == NO_LIMIT)
    return 0;
  if (now >= due)
    return 1;
  if (due - now < *next)
    *next = due - now;
  return 0;
}

#endif
