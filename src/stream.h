/* The stream struct, shared by stream.c and tls.c. */
#ifndef TS_STREAM_H
#define TS_STREAM_H

#include "internal.h"

#include <stddef.h>

typedef struct ts_tls ts_tls;
typedef struct ts_proxy ts_proxy;

/* A write the kernel did not take at once: the request and its bytes. */
typedef struct write_req {
  uv_write_t req;
  ts_buf buf;
} write_req;

enum { RD_NONE, RD_UNTIL, RD_BYTES, RD_PARTIAL, RD_CLOSE };

enum {
  F_PIPE = 1 << 0,
  F_READING = 1 << 1,   /* uv_read_start is active */
  F_EOF = 1 << 2,       /* the peer finished sending */
  F_CLOSED = 1 << 3,    /* close() was called or an error ended it */
  F_HCLOSING = 1 << 4,  /* uv_close was called */
  F_DONE = 1 << 5,      /* the close callback ran */
  F_DIRTY = 1 << 7,     /* on the loop's dirty list */
  F_BORROWED = 1 << 8,  /* rbuf points into the loop's shared buffer */
  F_TASK = 1 << 10,     /* a server's handler runs on it: stay pinned */
  F_OVERBUDGET = 1 << 11 /* the read budget refused its buffer */
};

/* What a task waits for on a stream (see wait_on). */
enum { SLOT_READER = 1, SLOT_HANDSHAKE };

/* Tasks waiting in write() or flush(), in the order they wrote: each wakes
 * once the bytes up to `until` (a count since the stream opened) have been
 * handed to the kernel. */
typedef struct write_waiter {
  lua_State *co;
  int ref;
  uint64_t until;
} write_waiter;

typedef struct write_queue {
  int n, cap;
  write_waiter *w;
} write_queue;

#define WRITE_HIGH_WATER (1024 * 1024)
#define DIRECT_WRITE_MIN (16 * 1024) /* see write_direct */
#define LINGER_MS 10000

struct ts_stream {
  const char *tag;        /* identifies a live stream userdata cheaply */
  ts_buf rbuf;
  ts_buf wbuf;            /* filled by write() */
  struct write_req *inflight; /* the uv_write under way, with its bytes */
  uv_timer_t *timer;      /* wait timeouts and close linger; lazy */
  ts_stream *next_dirty;
  lua_State *rco;         /* the task waiting to read */
  write_queue *wq;        /* tasks waiting for the write buffer; lazy */
  uint64_t wtotal;        /* bytes ever passed to write() */
  int self_ref, close_cb_ref;
  int hs_anchor;          /* ref to the handshake waiter */
  int handler_ref, addr_ref; /* while a server's handler runs on it */
  int err;                /* the libuv error that ended the stream */
  uint16_t flags;
  uint8_t rmode;
  size_t rn;              /* read_bytes count or read_until max_bytes */
  const char *delim;      /* lives on the waiting task's stack */
  size_t dlen, scan;
  uint32_t max_buffer, chunk, read_high_water; /* < 4 GiB: see init.lua */
  float timeout;          /* seconds; <= 0 means none */
  ts_tls *tls;            /* NULL on a plain stream */
  ts_proxy *proxy;        /* waiting for a PROXY header, or NULL */
  /* Last, so that a TCP stream is allocated without a pipe's extra bytes
   * (see TS_STREAM_SIZE): idle connections are counted in bytes. */
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } h;
};

#define TS_STREAM_SIZE(is_pipe) \
  (offsetof(ts_stream, h) + ((is_pipe) ? sizeof(uv_pipe_t) : sizeof(uv_tcp_t)))

/* stream.c, for tls.c */
void ts__stream_close(ts_stream *s, int err);
void ts__stream_on_data(ts_stream *s);
void ts__stream_on_eof(ts_stream *s);
void ts__stream_unborrow(ts_stream *s);
int ts__stream_borrow(ts_stream *s);
int ts__stream_wait(lua_State *L, ts_stream *s, lua_State **cop, int slot);
void ts__stream_wake(ts_stream *s, lua_State **cop, int slot, int nres);
const char *ts__stream_error(ts_stream *s);
void ts__stream_start_timer(ts_stream *s, uint64_t ms);
int ts__stream_writing(ts_stream *s); /* a task waits in write or flush */
int ts__stream_reserve(ts_stream *s, size_t room);
void ts__stream_refuse_growth(ts_stream *s);

/* proxy.c */
int ts__proxy_begin(lua_State *L, ts_stream *s, int handler_ref, int ctx_ref,
                    double timeout);
void ts__proxy_on_data(ts_stream *s);
void ts__proxy_on_eof(ts_stream *s);
void ts__proxy_timeout(ts_stream *s);

/* tls.c, for stream.c */
void ts__tls_on_read(ts_stream *s, const char *data, size_t n);
void ts__tls_on_eof(ts_stream *s);
void ts__tls_on_error(ts_stream *s, int err);
int ts__tls_encrypt(ts_stream *s);
void ts__tls_pump(ts_stream *s);
void ts__tls_shutdown(ts_stream *s);
void ts__tls_closed(ts_stream *s);
void ts__tls_free(lua_State *L, ts_stream *s);
ts_buf *ts__tls_out(ts_stream *s); /* ciphertext waiting to be written */
int ts__tls_attach(lua_State *L, ts_stream *s, int ctx_idx, int server,
                   const char *host, double timeout);
const char *ts__tls_error(ts_stream *s);

#endif
