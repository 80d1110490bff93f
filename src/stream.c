/* IOStream over uv_tcp_t / uv_pipe_t: read requests served from one
 * buffer, a write buffer flushed once per wake-up, and an explicit close.
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

static void stream_close(ts_stream *s, int err);
static void update_reading(ts_stream *s);

/* The address every stream carries in `tag`. */
static const char stream_tag[] = TS_STREAM_MT;

/* Runs on every read and write: a userdata of our size that carries our
 * tag is a stream (luaL_checkudata's lookup of the metatable by name cost
 * a third of the echo path). Anything else gets luaL_checkudata's error. */
static ts_stream *check_stream(lua_State *L) {
  ts_stream *s = lua_touserdata(L, 1);

  size_t size = s != NULL ? lua_rawlen(L, 1) : 0;

  if ((size != TS_STREAM_SIZE(0) && size != TS_STREAM_SIZE(1)) ||
      s->tag != stream_tag)
    return luaL_checkudata(L, 1, TS_STREAM_MT);
  return s;
}

uv_stream_t *ts__stream_handle(ts_stream *s) {
  return &s->h.stream;
}

static size_t pending_writes(ts_stream *s) {
  return ts_buf_len(&s->wbuf) +
         (s->inflight != NULL ? ts_buf_len(&s->inflight->buf) : 0) +
         (s->tls != NULL ? ts_buf_len(ts__tls_out(s)) : 0);
}

static int quiet_error(int err) {
  return err == 0 || err == UV_ECONNRESET || err == UV_EPIPE ||
         err == UV_ECONNABORTED || err == UV_ETIMEDOUT || err == UV_EOF;
}

const char *ts__errname(int err) {
  switch (err) {
  case UV_ECONNREFUSED: return "connection refused";
  case UV_ETIMEDOUT: return "timeout";
  case UV_ECANCELED: return "closed";
  case UV_E2BIG: return "too large";
  default: return quiet_error(err) ? "closed" : uv_strerror(err);
  }
}

/* Writes the IP of sa into host; returns its port. */
int ts__addr_name(const struct sockaddr *sa, char *host, size_t len) {
  if (sa->sa_family == AF_INET6) {
    uv_ip6_name((const struct sockaddr_in6 *)sa, host, len);
    return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
  }
  if (sa->sa_family == AF_INET) {
    uv_ip4_name((const struct sockaddr_in *)sa, host, len);
    return ntohs(((const struct sockaddr_in *)sa)->sin_port);
  }
  if (len > 0)
    host[0] = '\0';
  return 0;
}

int ts__push_addr(lua_State *L, const struct sockaddr *sa) {
  char host[INET6_ADDRSTRLEN];
  int port = ts__addr_name(sa, host, sizeof(host));
  const char *family = sa->sa_family == AF_INET6 ? "inet6"
                       : sa->sa_family == AF_INET ? "inet" : "unix";

  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  lua_pushstring(L, family);
  return 3;
}

/* The error a failed read or write reports. */
const char *ts__stream_error(ts_stream *s) {
  const char *tls = s->tls ? ts__tls_error(s) : NULL;
  return tls ? tls : ts__errname(s->err);
}

/* ---- waking tasks ---- */

int ts__stream_writing(ts_stream *s) {
  return s->wq != NULL && s->wq->n > 0;
}

static void stop_timer(ts_stream *s) {
  if (s->timer != NULL && s->rco == NULL && !ts__stream_writing(s) &&
      !(s->flags & F_CLOSED))
    uv_timer_stop(s->timer);
}

/* A woken reader stays in the user value after the wake: it is running
 * then, and the next wait overwrites it. The handshake waiter holds a
 * registry ref, dropped after the resume (which may have taken a new one). */
static void wake(ts_stream *s, lua_State **cop, int slot, int nres) {
  lua_State *co = *cop;
  int ref = LUA_NOREF;

  *cop = NULL;
  if (slot == SLOT_HANDSHAKE) {
    ref = s->hs_anchor;
    s->hs_anchor = LUA_NOREF;
  }
  stop_timer(s);
  ts__resume(co, nres);
  luaL_unref(co, LUA_REGISTRYINDEX, ref);
}

static void timer_cb(uv_timer_t *t);

static void start_timer(ts_stream *s, uint64_t ms) {
  if (s->timer == NULL) {
    s->timer = malloc(sizeof(*s->timer));
    if (s->timer == NULL)
      return; /* no timeout then, rather than no stream */
    uv_timer_init(s->h.handle.loop, s->timer);
    s->timer->data = s;
  }
  uv_timer_start(s->timer, timer_cb, ms, 0);
}

void ts__stream_start_timer(ts_stream *s, uint64_t ms) {
  start_timer(s, ms);
}

/* Suspends the task L, which called a method of s (at index 1), until a
 * callback wakes it. A reader, the common case, is anchored in the stream's
 * user value (a registry ref per read cost more than the rest of it). */
static int wait_on(lua_State *L, ts_stream *s, lua_State **cop, int slot) {
  *cop = L;
  lua_pushthread(L);
  if (slot == SLOT_READER)
    lua_setiuservalue(L, 1, 1);
  else
    s->hs_anchor = luaL_ref(L, LUA_REGISTRYINDEX);
  if (s->timeout > 0)
    start_timer(s, ts__timeout_ms(s->timeout));
  return ts__park(L);
}

void ts__stream_wake(ts_stream *s, lua_State **cop, int slot, int nres) {
  wake(s, cop, slot, nres);
}

int ts__stream_wait(lua_State *L, ts_stream *s, lua_State **cop, int slot) {
  return wait_on(L, s, cop, slot);
}

/* ---- reading ---- */

static int push_consume(ts_stream *s, lua_State *L, size_t n) {
  lua_pushlstring(L, ts_buf_head(&s->rbuf), n);
  ts_buf_consume(&s->rbuf, n);
  s->scan = 0;
  s->rmode = RD_NONE;
  return 1;
}

static int fail(ts_stream *s, lua_State *L, const char *err) {
  s->rmode = RD_NONE;
  s->scan = 0;
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

static int fail_too_large(ts_stream *s, lua_State *L) {
  fail(s, L, "too large");
  stream_close(s, 0);
  return 2;
}

/* The peer is gone: hand over what is left as the partial result. */
static int fail_closed(ts_stream *s, lua_State *L) {
  fail(s, L, ts__stream_error(s));
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
  long at;

  switch (s->rmode) {
  case RD_UNTIL:
    at = ts_buf_find(&s->rbuf, s->delim, s->dlen, &s->scan);
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

/* ---- the read budget: the loop's private read buffers together ---- */

static void account(ts_loop *loop, size_t before, size_t after) {
  loop->rbuf_bytes += after - before; /* wraps back when after < before */
  loop->rbuf_count += (before == 0 && after > 0) - (before > 0 && after == 0);
}

/* Past the budget, a buffer may still grow while it holds less than its
 * share, so the largest buffers are the ones refused and the total stays
 * under about twice the budget (buffers grow by doubling). */
static int over_budget(ts_loop *loop, ts_stream *s, size_t room) {
  size_t cap = s->rbuf.cap, growth = room > cap ? room : cap, share;

  if (loop->rbuf_bytes + growth <= loop->rbuf_budget)
    return 0;
  share = loop->rbuf_budget / (loop->rbuf_count + (cap == 0));
  return cap + room > share;
}

/* ts_buf_reserve on s's own read buffer, within the budget: 0, UV_E2BIG
 * (the stream must end: "too large") or UV_ENOMEM. */
int ts__stream_reserve(ts_stream *s, size_t room) {
  ts_loop *loop = s->h.handle.loop->data;
  size_t before = s->rbuf.cap;

  if (ts_buf_room(&s->rbuf) >= room)
    return 0;
  if (s->rbuf.cap - ts_buf_len(&s->rbuf) >= room) /* compacting will do */
    return ts_buf_reserve(&s->rbuf, room, s->max_buffer) ? UV_ENOMEM : 0;
  if (over_budget(loop, s, room))
    return UV_E2BIG;
  if (ts_buf_reserve(&s->rbuf, room, s->max_buffer) != 0)
    return UV_ENOMEM;
  account(loop, before, s->rbuf.cap);
  return 0;
}

static void free_rbuf(ts_stream *s) {
  account(s->h.handle.loop->data, s->rbuf.cap, 0);
  ts_buf_free(&s->rbuf);
}

/* Ends a stream whose buffer the budget refused; its reader, if any, gets
 * "too large" with what was read so far. */
void ts__stream_refuse_growth(ts_stream *s) {
  ts_loop *loop = s->h.handle.loop->data;
  char msg[160];

  snprintf(msg, sizeof(msg), "read buffers over the budget (%zu of %zu bytes): "
           "closing a connection holding %zu", loop->rbuf_bytes,
           loop->rbuf_budget, ts_buf_len(&s->rbuf));
  ts__log(loop, "warning", msg);
  stream_close(s, UV_E2BIG);
}

/* Copies what is left of a borrowed shared buffer into the stream's own. */
static void unborrow(ts_stream *s) {
  ts_buf shared = s->rbuf;
  int err;

  if (!(s->flags & F_BORROWED))
    return;
  s->flags &= ~F_BORROWED;
  ((ts_loop *)s->h.handle.loop->data)->borrower = NULL;
  ts_buf_init(&s->rbuf);
  if (ts_buf_len(&shared) == 0)
    return;
  err = ts__stream_reserve(s, ts_buf_len(&shared));
  if (err == UV_E2BIG)
    ts__stream_refuse_growth(s);
  else if (err != 0)
    stream_close(s, err);
  else
    ts_buf_append(&s->rbuf, ts_buf_head(&shared), ts_buf_len(&shared));
}

/* Lends the loop's shared buffer as s's empty read buffer, unless another
 * stream holds it (its task may be running and reading it). */
int ts__stream_borrow(ts_stream *s) {
  ts_loop *loop = s->h.handle.loop->data;

  if (loop->borrower != NULL)
    return loop->borrower == s;
  free_rbuf(s);
  s->rbuf.data = loop->shared;
  s->rbuf.cap = TS_SHARED_READ_SIZE;
  s->flags |= F_BORROWED;
  loop->borrower = s;
  return 1;
}

void ts__stream_unborrow(ts_stream *s) {
  unborrow(s);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  ts_stream *s = h->data;
  ts_loop *loop = h->loop->data;
  size_t len = ts_buf_len(&s->rbuf), want = s->chunk, room;

  (void)suggested;
  if (s->tls != NULL) { /* ciphertext: fed to OpenSSL at once */
    *buf = uv_buf_init(loop->shared, TS_SHARED_READ_SIZE);
    return;
  }
  if (len == 0 && loop->borrower == NULL) {
    free_rbuf(s);
    want = want < s->max_buffer ? want : s->max_buffer;
    *buf = uv_buf_init(loop->shared, want < TS_SHARED_READ_SIZE ? want
                                                                : TS_SHARED_READ_SIZE);
    return;
  }
  /* A large read_bytes reads straight into a buffer of its size. */
  if ((s->rmode == RD_BYTES || s->rmode == RD_PARTIAL) && s->rn > len + want)
    want = s->rn - len;
  room = s->max_buffer > len ? s->max_buffer - len : 0;
  want = want < room ? want : room;
  if (want == 0 || ts__stream_reserve(s, want) != 0) {
    if (want > 0 && over_budget(loop, s, want))
      s->flags |= F_OVERBUDGET; /* read_cb ends it (UV_ENOBUFS) */
    *buf = uv_buf_init(NULL, 0);
    return;
  }
  room = ts_buf_room(&s->rbuf) < room ? ts_buf_room(&s->rbuf) : room;
  *buf = uv_buf_init(ts_buf_tail(&s->rbuf), (unsigned)room);
}

static void on_data(ts_stream *s) {
  int n;

  if (s->proxy != NULL) {
    ts__proxy_on_data(s);
    update_reading(s);
    return;
  }
  /* The woken task reads what else it wants straight from the borrowed
   * buffer; only what it leaves there is copied. */
  if (s->rco != NULL && (n = try_read(s, s->rco)) > 0)
    wake(s, &s->rco, SLOT_READER, n);
  unborrow(s);
  update_reading(s);
}

static void on_eof(ts_stream *s) {
  s->flags |= F_EOF;
  if (s->proxy != NULL) {
    ts__proxy_on_eof(s);
    return;
  }
  if (s->rco != NULL)
    wake(s, &s->rco, SLOT_READER, try_read(s, s->rco));
  else if (ts_buf_len(&s->rbuf) == 0)
    stream_close(s, 0);
  /* What nobody read yet must leave the shared buffer: the next read of
   * any stream overwrites it. */
  unborrow(s);
  update_reading(s);
}

static void check_writers(ts_stream *s);

/* The TLS layer's bytes in: it has flushed what the handshake released,
 * which may be what a writer waits for. */
void ts__stream_on_data(ts_stream *s) {
  on_data(s);
  check_writers(s);
}

void ts__stream_on_eof(ts_stream *s) {
  on_eof(s);
  check_writers(s);
}

static void read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  ts_stream *s = h->data;

  if (s->tls != NULL && nread > 0) {
    ts__tls_on_read(s, buf->base, (size_t)nread);
  } else if (s->tls != NULL && nread == UV_EOF) {
    ts__tls_on_eof(s);
  } else if (nread > 0) {
    if (buf->base == ((ts_loop *)h->loop->data)->shared) {
      ts__stream_borrow(s);
      s->rbuf.end = (size_t)nread;
    } else {
      s->rbuf.end += (size_t)nread;
    }
    on_data(s);
  } else if (nread == UV_EOF) {
    on_eof(s);
  } else if (nread == UV_ENOBUFS && (s->flags & F_OVERBUDGET)) {
    ts__stream_refuse_growth(s);
  } else if (nread == UV_ENOBUFS) {
    update_reading(s);
  } else if (nread < 0) {
    if (s->tls != NULL)
      ts__tls_on_error(s, (int)nread);
    stream_close(s, (int)nread);
  }
}

static void update_reading(ts_stream *s) {
  /* A PROXY header (at most a few hundred bytes) is read whole too. */
  int want = !(s->flags & (F_EOF | F_CLOSED)) &&
             (s->rco != NULL || s->proxy != NULL ||
              ts_buf_len(&s->rbuf) < s->read_high_water);
  int err;

  if (want && !(s->flags & F_READING)) {
    err = uv_read_start(&s->h.stream, alloc_cb, read_cb);
    if (err != 0) {
      stream_close(s, err);
      return;
    }
    s->flags |= F_READING;
  } else if (!want && (s->flags & F_READING)) {
    uv_read_stop(&s->h.stream);
    s->flags &= ~F_READING;
  }
}

/* Common tail of the read methods: answer now or wait. */
static int read_request(lua_State *L, ts_stream *s, int mode, size_t n) {
  int r, lent;

  if (s->rco != NULL)
    return luaL_error(L, "already reading");
  s->rmode = mode;
  s->rn = n;
  lent = (s->flags & F_BORROWED) != 0; /* by on_data, which wakes us */
  if (s->tls != NULL) /* plaintext OpenSSL holds back past max_buffer_size */
    ts__tls_pump(s);
  r = try_read(s, L);
  if (!lent)
    unborrow(s);
  if (r > 0) {
    update_reading(s);
    return r;
  }
  if (!ts__in_task(L)) {
    s->rmode = RD_NONE;
    ts__check_task(L, "read");
  }
  s->rco = L; /* a reader reads past the high-water mark */
  update_reading(s);
  s->rco = NULL;
  if (s->flags & F_CLOSED) /* update_reading failed */
    return try_read(s, L);
  return wait_on(L, s, &s->rco, SLOT_READER);
}

static int l_read_until(lua_State *L) {
  ts_stream *s = check_stream(L);
  size_t dlen;
  const char *delim = luaL_checklstring(L, 2, &dlen);
  lua_Integer max = luaL_optinteger(L, 3, 0);

  luaL_argcheck(L, dlen > 0, 2, "empty delimiter");
  luaL_argcheck(L, max >= 0, 3, "max_bytes must not be negative");
  if (s->rco == NULL) {
    s->delim = delim;
    s->dlen = dlen;
    s->scan = 0;
  }
  return read_request(L, s, RD_UNTIL, (size_t)max);
}

static int l_read_bytes(lua_State *L) {
  ts_stream *s = check_stream(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  int partial = lua_toboolean(L, 3);

  luaL_argcheck(L, n >= 0, 2, "byte count must not be negative");
  if (n == 0 && s->rco == NULL) {
    lua_pushliteral(L, "");
    return 1;
  }
  return read_request(L, s, partial ? RD_PARTIAL : RD_BYTES, (size_t)n);
}

static int l_read_until_close(lua_State *L) {
  return read_request(L, check_stream(L), RD_CLOSE, 0);
}

/* ---- writing ---- */

static void write_cb(uv_write_t *req, int status);

/* Hands the write buffer to the kernel: try_write first, then one uv_write
 * for what is left. Returns 0 or a libuv error (the stream is closed). */
int ts__stream_flush(ts_stream *s) {
  ts_buf *src = s->tls != NULL ? ts__tls_out(s) : &s->wbuf;
  write_req *w;
  uv_buf_t b;
  int n;

  if (s->flags & F_HCLOSING)
    return 0;
  if (s->tls != NULL && (n = ts__tls_encrypt(s)) != 0)
    goto fail;
  if (s->inflight != NULL || ts_buf_len(src) == 0)
    return 0;
  b = uv_buf_init(ts_buf_head(src), (unsigned)ts_buf_len(src));
  n = uv_try_write(&s->h.stream, &b, 1);
  if (n == (int)b.len) {
    ts_buf_release(src, &((ts_loop *)s->h.handle.loop->data)->wpool);
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

/* Bytes of write() handed to the kernel so far. With TLS the pending
 * bytes are partly ciphertext, so this lags a little: never early. */
static uint64_t bytes_sent(ts_stream *s) {
  size_t left = pending_writes(s);
  return left < s->wtotal ? s->wtotal - left : 0;
}

/* Queues the task L to wake once `until` bytes are sent. */
static int wait_written(lua_State *L, ts_stream *s, uint64_t until) {
  write_queue *q = s->wq;
  write_waiter *w;

  if (q == NULL && (q = s->wq = calloc(1, sizeof(*q))) == NULL)
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
  w->co = L;
  w->until = until;
  lua_pushthread(L);
  w->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (s->timeout > 0)
    start_timer(s, ts__timeout_ms(s->timeout));
  return ts__park(L);
}

/* Removes waiter i and resumes it with `err` (NULL: success). */
static void wake_writer(ts_stream *s, int i, const char *err) {
  write_queue *q = s->wq;
  write_waiter w = q->w[i];

  memmove(&q->w[i], &q->w[i + 1], (size_t)(q->n - i - 1) * sizeof(w));
  q->n--;
  stop_timer(s);
  if (err == NULL) {
    lua_pushboolean(w.co, 1);
  } else {
    lua_pushnil(w.co);
    lua_pushstring(w.co, err);
  }
  ts__resume(w.co, err == NULL ? 1 : 2);
  luaL_unref(w.co, LUA_REGISTRYINDEX, w.ref);
}

/* Wakes, in order, the writers whose bytes are sent, or all of them with
 * `err`. A woken task may write and wait again: rescan from the start. */
static void wake_writers(ts_stream *s, const char *err) {
  int i = 0;

  while (s->wq != NULL && i < s->wq->n) {
    if (err != NULL || bytes_sent(s) >= s->wq->w[i].until) {
      wake_writer(s, i, err);
      i = 0;
    } else {
      i++;
    }
  }
}

static void check_writers(ts_stream *s) {
  if (!ts__stream_writing(s))
    return;
  wake_writers(s, NULL);
  if (s->flags & F_CLOSED)
    wake_writers(s, ts__stream_error(s));
}

static void handle_close(ts_stream *s);

static void write_cb(uv_write_t *req, int status) {
  ts_stream *s = req->data;
  write_req *w = (write_req *)req;

  ts_buf_release(&w->buf, &((ts_loop *)s->h.handle.loop->data)->wpool);
  free(w);
  s->inflight = NULL;
  if (status == UV_ECANCELED)
    return;
  if (status < 0) {
    stream_close(s, status);
    return;
  }
  if (ts__stream_flush(s) != 0)
    return;
  if ((s->flags & F_CLOSED) && pending_writes(s) == 0)
    handle_close(s);
  else
    check_writers(s);
}

static void mark_dirty(ts_stream *s) {
  ts_loop *loop;

  if (s->flags & F_DIRTY)
    return;
  loop = s->h.handle.loop->data;
  s->flags |= F_DIRTY;
  s->next_dirty = loop->dirty;
  loop->dirty = s;
}

void ts__flush_dirty(ts_loop *loop) {
  ts_stream *s;

  while ((s = loop->dirty) != NULL) {
    loop->dirty = s->next_dirty;
    s->flags &= ~F_DIRTY;
    ts__stream_flush(s);
  }
}

/* write({...}): the strings of an array, in order. */
static int append_array(lua_State *L, ts_stream *s) {
  lua_Integer i, n;
  size_t len;
  const char *p;

  luaL_argexpected(L, lua_type(L, 2) == LUA_TTABLE, 2, "string or array of strings");
  n = luaL_len(L, 2);
  for (i = 1; i <= n; i++) {
    if (lua_geti(L, 2, i) != LUA_TSTRING)
      return luaL_error(L, "bad argument #1 to 'write' (item %d is not a string)",
                        (int)i);
    p = lua_tolstring(L, -1, &len);
    if (ts_buf_append(&s->wbuf, p, len) != 0)
      return UV_ENOMEM;
    s->wtotal += len;
    lua_pop(L, 1);
  }
  return 0;
}

static int push_error(lua_State *L, const char *err) {
  lua_pushnil(L);
  lua_pushstring(L, err);
  return 2;
}

/* A large string with nothing queued before it goes to the kernel at once,
 * straight from the Lua string: copying it into the write buffer first
 * would cost more than the syscall that batching saves. Returns 1 if it
 * does not apply, else 0 (the rest, if any, is appended) or an error. */
static int write_direct(ts_stream *s, const char *p, size_t len) {
  uv_buf_t b;
  int n;

  if (len < DIRECT_WRITE_MIN || len > INT_MAX || s->tls != NULL ||
      pending_writes(s) > 0)
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

/* Queues one string (the common case, fetched once) or an array of them. */
static int append_arg(lua_State *L, ts_stream *s) {
  size_t len;
  const char *p;
  int rc;

  if (lua_type(L, 2) != LUA_TSTRING) {
    ts_buf_adopt(&s->wbuf, &((ts_loop *)s->h.handle.loop->data)->wpool);
    return append_array(L, s);
  }
  p = lua_tolstring(L, 2, &len);
  s->wtotal += len;
  rc = write_direct(s, p, len);
  if (rc != 1)
    return rc;
  ts_buf_adopt(&s->wbuf, &((ts_loop *)s->h.handle.loop->data)->wpool);
  return ts_buf_append(&s->wbuf, p, len) ? UV_ENOMEM : 0;
}

static int l_write(lua_State *L) {
  ts_stream *s = check_stream(L);
  int rc;

  if (s->flags & F_CLOSED) {
    luaL_checkany(L, 2);
    return push_error(L, ts__stream_error(s));
  }
  rc = append_arg(L, s);
  if (rc == UV_ENOMEM)
    return luaL_error(L, "write: out of memory");
  if (rc != 0)
    return push_error(L, ts__stream_error(s));
  if (ts_buf_len(&s->wbuf) > 0)
    mark_dirty(s);
  if (pending_writes(s) > WRITE_HIGH_WATER && ts__in_task(L)) {
    if (ts__stream_flush(s) != 0)
      return push_error(L, ts__stream_error(s));
    if (pending_writes(s) > WRITE_HIGH_WATER)
      return wait_written(L, s, s->wtotal - WRITE_HIGH_WATER / 2);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_flush(lua_State *L) {
  ts_stream *s = check_stream(L);

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
  ts_loop *loop = s->h.handle.loop->data;
  ts_stream **p;

  for (p = &loop->dirty; *p != NULL; p = &(*p)->next_dirty) {
    if (*p == s) {
      *p = s->next_dirty;
      break;
    }
  }
  s->flags &= ~F_DIRTY;
}

static void close_cb(uv_handle_t *h) {
  ts_stream *s = h->data;
  ts_loop *loop = h->loop->data;
  lua_State *L = loop->L;

  if (s->flags & F_DIRTY)
    unlink_dirty(s);
  ts_buf_release(&s->wbuf, &loop->wpool);
  s->flags |= F_DONE;
  if (s->tls != NULL)
    ts__tls_closed(s);
  if (s->rco != NULL)
    wake(s, &s->rco, SLOT_READER, try_read(s, s->rco));
  check_writers(s);
  if (s->wq != NULL) { /* woken writers cannot wait again: closed */
    free(s->wq->w);
    free(s->wq);
    s->wq = NULL;
  }
  if (s->close_cb_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->close_cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, s->close_cb_ref);
    s->close_cb_ref = LUA_NOREF;
    ts__pcall(loop, 0);
  }
  if (!(s->flags & F_TASK)) { /* else the task's end unpins it */
    luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
    s->self_ref = LUA_NOREF;
  }
}

/* The handler's task ended: the server's done(stream, address, failed,
 * err, traceback) closes the stream and keeps the books. */
void ts__stream_task_done(lua_State *L, ts_stream *s, lua_State *co, int status) {
  int failed = status != LUA_OK;

  s->flags &= ~F_TASK;
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->handler_ref);
  lua_getfield(L, -1, "done");
  lua_remove(L, -2);
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
  lua_pushnil(L);
  lua_setiuservalue(L, -2, 1); /* the ended task, if it was a reader */
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->addr_ref);
  lua_pushboolean(L, failed);
  if (failed) {
    const char *msg = lua_tostring(co, -1);
    lua_pushvalue(co, -1);
    lua_xmove(co, L, 1);
    luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, s->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, s->addr_ref);
  s->handler_ref = s->addr_ref = LUA_NOREF;
  ts__pcall_on(L, failed ? 5 : 3);
  if (s->flags & F_DONE) {
    luaL_unref(L, LUA_REGISTRYINDEX, s->self_ref);
    s->self_ref = LUA_NOREF;
  }
}

static void handle_close(ts_stream *s) {
  if (s->flags & F_HCLOSING)
    return;
  s->flags |= F_HCLOSING;
  if (s->timer != NULL) {
    uv_close((uv_handle_t *)s->timer, timer_free);
    s->timer = NULL;
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
  s->flags |= F_CLOSED;
  if (err != 0) {
    s->err = err;
    if (!quiet_error(err) && err != UV_ECANCELED && err != UV_E2BIG) {
      char msg[128];
      snprintf(msg, sizeof(msg), "stream error: %s", uv_strerror(err));
      ts__report(s->h.handle.loop->data, msg);
    }
  }
  if (s->flags & F_READING) {
    uv_read_stop(&s->h.stream);
    s->flags &= ~F_READING;
  }
  if (err == 0 && s->tls != NULL)
    ts__tls_shutdown(s);
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

/* Closes at once, dropping unwritten data (used when a server stops). */
void ts__stream_abort(ts_stream *s) {
  stream_close(s, UV_ECANCELED);
}

static void timer_cb(uv_timer_t *t) {
  ts_stream *s = t->data;

  if (s->flags & F_CLOSED) { /* the linger ran out */
    handle_close(s);
    return;
  }
  if (s->proxy != NULL) {
    ts__proxy_timeout(s);
    return;
  }
  if (s->rco != NULL) {
    fail(s, s->rco, "timeout");
    wake(s, &s->rco, SLOT_READER, 2);
  }
  wake_writers(s, "timeout");
  update_reading(s);
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
  if (s->tls != NULL)
    ts__tls_free(L, s);
  return 0;
}

static int l_closed(lua_State *L) {
  lua_pushboolean(L, (check_stream(L)->flags & F_CLOSED) != 0);
  return 1;
}

static int l_set_close_callback(lua_State *L) {
  ts_stream *s = check_stream(L);

  if (!lua_isnoneornil(L, 2))
    luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, s->close_cb_ref);
  s->close_cb_ref = LUA_NOREF;
  lua_settop(L, 2);
  if (s->flags & F_DONE) {
    if (!lua_isnil(L, 2))
      lua_call(L, 0, 0);
  } else if (!lua_isnil(L, 2)) {
    s->close_cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return 0;
}

/* ---- options and addresses ---- */

static int l_settimeout(lua_State *L) {
  ts_stream *s = check_stream(L);
  lua_Number t = luaL_optnumber(L, 2, 0);
  luaL_argcheck(L, t >= 0, 2, "timeout must not be negative");
  s->timeout = ts__timeout_ms(t) > 0 ? (float)t : 0;
  return 0;
}

static int l_set_nodelay(lua_State *L) {
  ts_stream *s = check_stream(L);
  int on = lua_isnone(L, 2) || lua_toboolean(L, 2);
  if (!(s->flags & (F_PIPE | F_HCLOSING)))
    uv_tcp_nodelay(&s->h.tcp, on);
  return 0;
}

static int push_name(lua_State *L, int peer) {
  ts_stream *s = check_stream(L);
  struct sockaddr_storage ss;
  int len = sizeof(ss), err;

  if (s->flags & F_HCLOSING)
    return push_error(L, "closed");
  if (s->flags & F_PIPE) {
    char path[1024];
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

static int l_getpeername(lua_State *L) { return push_name(L, 1); }
static int l_getsockname(lua_State *L) { return push_name(L, 0); }

/* buffer_sizes() -> bytes read but not consumed, bytes not yet written */
static int l_buffer_sizes(lua_State *L) {
  ts_stream *s = check_stream(L);
  lua_pushinteger(L, (lua_Integer)ts_buf_len(&s->rbuf));
  lua_pushinteger(L, (lua_Integer)pending_writes(s));
  return 2;
}

static int l_tostring(lua_State *L) {
  ts_stream *s = check_stream(L);
  lua_pushfstring(L, "tcpserver.stream (%p)%s", (void *)s,
                  (s->flags & F_CLOSED) ? " closed" : "");
  return 1;
}

/* ---- creation ---- */

void ts__stream_configure(ts_stream *s, size_t max_buffer, size_t chunk,
                          double timeout) {
  s->max_buffer = (uint32_t)(max_buffer < UINT32_MAX ? max_buffer : UINT32_MAX);
  s->chunk = (uint32_t)(chunk < s->max_buffer ? chunk : s->max_buffer);
  s->read_high_water = 4 * (size_t)s->chunk < s->max_buffer ? 4 * s->chunk : s->max_buffer;
  s->timeout = ts__timeout_ms(timeout) > 0 ? (float)timeout : 0;
}

ts_stream *ts__stream_new(lua_State *L, int is_pipe) {
  ts_loop *loop = ts__loop(L);
  size_t size = TS_STREAM_SIZE(is_pipe);
  ts_stream *s = lua_newuserdatauv(L, size, 1);

  memset(s, 0, size);
  s->tag = stream_tag;
  luaL_setmetatable(L, TS_STREAM_MT);
  if (is_pipe) {
    uv_pipe_init(loop->uv, &s->h.pipe, 0);
    s->flags |= F_PIPE;
  } else {
    uv_tcp_init(loop->uv, &s->h.tcp);
  }
  s->h.handle.data = s;
  s->close_cb_ref = s->hs_anchor = LUA_NOREF;
  s->handler_ref = s->addr_ref = LUA_NOREF;
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

int ts__open_stream(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"read_until", l_read_until},
    {"read_bytes", l_read_bytes},
    {"read_until_close", l_read_until_close},
    {"write", l_write},
    {"flush", l_flush},
    {"close", l_close},
    {"closed", l_closed},
    {"set_close_callback", l_set_close_callback},
    {"settimeout", l_settimeout},
    {"set_nodelay", l_set_nodelay},
    {"getpeername", l_getpeername},
    {"getsockname", l_getsockname},
    {"buffer_sizes", l_buffer_sizes},
    {NULL, NULL}};
  static const luaL_Reg metamethods[] = {
    {"__gc", l_gc}, {"__close", l_close}, {"__tostring", l_tostring},
    {"__index", NULL}, {NULL, NULL}};

  luaL_newmetatable(L, TS_STREAM_MT);
  luaL_setfuncs(L, metamethods, 0);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  return 0;
}

void ts__stream_push(lua_State *L, ts_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, s->self_ref);
}
