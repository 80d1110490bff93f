/* The stream (stream.c): an IOStream over a uv_tcp_t or uv_pipe_t. Other
 * files see it only through these functions. A layer (TLS, or the server's
 * PROXY header step) plugs in through ts_layer_ops, so that the I/O path
 * never asks what the layer is. */
#ifndef TS_STREAM_H
#define TS_STREAM_H

#include "loop.h"

#include <stddef.h>
#include <stdint.h>

#define TS_STREAM_MT "tcpserver.stream"

typedef struct ts_stream ts_stream;

/* What a layer does with the bytes that pass (in the spirit of Redis's
 * ConnectionType). `layer` is the pointer given to ts__stream_attach. Any
 * entry but on_read may be NULL. */
typedef struct ts_layer_ops {
  /* Bytes from the socket, valid for this call only. The layer hands on
   * what they decode (ts__stream_read_space / _read_commit), then calls
   * ts__stream_on_data or ts__stream_on_eof. */
  void (*on_read)(ts_stream *s, void *layer, const char *data, size_t n);
  void (*on_eof)(ts_stream *s, void *layer);            /* the peer closed */
  void (*on_error)(ts_stream *s, void *layer, int err); /* the read failed */
  /* A read request came: deliver what was held back at max_buffer_size. */
  void (*pump)(ts_stream *s, void *layer);
  /* Moves what write() queued (ts__stream_plain) into the output. Returns
   * 0 or a libuv error. */
  int (*encode)(ts_stream *s, void *layer);
  ts_buf *(*output)(void *layer);              /* bytes for the socket (NULL: plain) */
  void (*shutdown)(ts_stream *s, void *layer); /* a clean close begins */
  const char *(*error)(void *layer);           /* why the stream failed, or NULL */
  /* The handle closed: wake what waits on the layer, free native state. */
  void (*closed)(ts_stream *s, void *layer);
  void (*free)(lua_State *L, void *layer); /* the stream is collected */
  /* Task co was killed: stop waiting for it (wait_for_handshake). */
  void (*forget)(ts_stream *s, void *layer, lua_State *co);
} ts_layer_ops;

/* What a stream's owner counts (server.c's listener counters begin with
 * one): the stream adds the application bytes it passes (after TLS), a
 * layer its failures (a TLS handshake), and the stream calls release once
 * when it is done with it. */
typedef struct ts_tally {
  uint64_t bytes_in, bytes_out;
  uint64_t layer_failures;
  void (*release)(lua_State *L, struct ts_tally *t);
} ts_tally;

void ts__stream_count_into(ts_stream *s, ts_tally *t); /* once, on a new stream */
ts_tally *ts__stream_tally(ts_stream *s);              /* or NULL */

/* Creating and running (client.c, subprocess.c, server.c) */
ts_stream *ts__stream_new(lua_State *L, int is_pipe); /* pushed, pinned */
uv_stream_t *ts__stream_handle(ts_stream *s);
ts_loop *ts__stream_loop(ts_stream *s);
void ts__stream_configure(ts_stream *s, size_t max_buffer, size_t chunk, double timeout);
int ts__stream_start(ts_stream *s); /* starts reading: 0 or a libuv error */
void ts__stream_push(lua_State *L, ts_stream *s);
ts_stream *ts__check_stream(lua_State *L, int idx);
/* Calls fn on every open stream of the loop (fn must not close any). */
void ts__stream_each(ts_loop *loop, void (*fn)(ts_stream *s, void *arg), void *arg);

/* The owner of a stream (server.c: a handler task, ts__spawn_owned) keeps
 * a value with it (pops it), and keeps it pinned past its close callback
 * until disown. The owner pointer is the stream's ts_loop * member. */
void ts__stream_keep(lua_State *L, ts_stream *s);
void ts__stream_push_kept(lua_State *L, ts_stream *s);
ts_loop **ts__stream_own(ts_stream *s);
ts_stream *ts__stream_of_owner(void *owner);
void ts__stream_disown(lua_State *L, ts_stream *s);
/* At the peer's end, with nothing left to read and nobody reading, a
 * stream closes, unless its owner keeps it open (server.c says when) and
 * no close callback waits for the end. */
void ts__stream_keep_open(ts_stream *s, int on);

/* Closing */
void ts__stream_close(ts_stream *s, int err); /* 0: flush first; else drop */
void ts__stream_fail(ts_stream *s, int err);  /* err is the reason; flushes */
void ts__stream_abort(ts_stream *s);          /* at once, dropping writes */
int ts__stream_closed(ts_stream *s);
const char *ts__stream_error(ts_stream *s); /* "closed", "timeout", ... */
double ts__stream_timeout(ts_stream *s);    /* set_timeout's, 0: none */

/* Layers */
void ts__stream_attach(ts_stream *s, const ts_layer_ops *ops, void *layer);
void *ts__stream_layer(ts_stream *s, const ts_layer_ops *ops); /* or NULL */
/* Why a layer cannot be attached now (STARTTLS), or NULL. */
const char *ts__stream_busy(ts_stream *s);
/* Where decoded bytes go: at least one byte of room, or NULL when the
 * buffer is full (max_buffer_size) or the stream ended. */
char *ts__stream_read_space(ts_stream *s, size_t *room);
void ts__stream_read_commit(ts_stream *s, size_t n);
/* Bytes a layer already took from the socket, kept whole even past
 * max_buffer_size (what a PROXY header step read beyond the header). */
int ts__stream_deliver(ts_stream *s, const char *data, size_t n);
void ts__stream_on_data(ts_stream *s);
void ts__stream_on_eof(ts_stream *s);
ts_buf *ts__stream_plain(ts_stream *s); /* what write() queued */
int ts__stream_flush(ts_stream *s);     /* 0 or a libuv error (closed) */

/* Adds methods to every stream (tls.c adds its own). */
void ts__stream_methods(lua_State *L, const luaL_Reg *methods);
int ts__open_stream(lua_State *L);

#endif
