/* Internal declarations shared by the core's source files. */
#ifndef TS_INTERNAL_H
#define TS_INTERNAL_H

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#include "buf.h"
#include "tcpserver.h"

#define TS_STREAM_MT "tcpserver.stream"
#define TS_TIMER_MT "tcpserver.timer"
#define TS_SOCKET_MT "tcpserver.socket"
#define TS_LISTENER_MT "tcpserver.listener"

/* The shared read buffer that idle streams borrow (see stream.c). */
#define TS_SHARED_READ_SIZE (64 * 1024)

typedef struct ts_stream ts_stream;

typedef struct ts_loop {
  uv_loop_t *uv;
  lua_State *L;          /* the thread running start(); callbacks run on it */
  ts_stream *dirty;      /* streams with unflushed writes */
  ts_stream *borrower;   /* the stream whose rbuf is `shared` right now */
  ts_buf_pool wpool;     /* drained write buffers */
  int running;
  int parked;            /* the task being resumed waits on something */
  int log_ref;           /* Lua function(level, msg) for the core's logs */
  size_t rbuf_bytes;     /* held by streams' own read buffers */
  size_t rbuf_count;     /* streams holding one */
  size_t rbuf_budget;    /* the most rbuf_bytes should reach */
  size_t ended;          /* tasks ended since the last full collection */
  size_t walked;         /* dead-thread walks since then (an upper bound) */
  size_t walk_budget;    /* walks that cost about one full collection */
  uv_prepare_t full_collect;
  char shared[TS_SHARED_READ_SIZE];
} ts_loop;

ts_loop *ts__loop(lua_State *L);
/* Seconds to a libuv timeout in ms; 0 means none: none was asked for, or
 * more than libuv can time (casting such a double is undefined). */
uint64_t ts__timeout_ms(double seconds);
/* Marks `co` as a loop task: yielding calls are allowed there. */
void ts__mark_task(lua_State *co, void *owner);
int ts__in_task(lua_State *L);
/* Suspends the task L until a callback resumes it: every wait ends here,
 * so that a bare coroutine.yield, which nothing would resume, is told
 * apart (see resume_from). Use as `return ts__park(L);`. */
int ts__park(lua_State *L);
/* Raises unless L is a task; used before a call may yield. */
void ts__check_task(lua_State *L, const char *what);
/* Resumes a task with `narg` values already on its stack, reports an
 * uncaught error, then flushes the writes it made. */
void ts__resume(lua_State *co, int narg);
/* Calls the function under `narg` args on loop->L, logging any error. */
void ts__pcall(ts_loop *loop, int narg);
void ts__pcall_on(lua_State *L, int narg);
void ts__log(ts_loop *loop, const char *level, const char *msg);
void ts__report(ts_loop *loop, const char *msg); /* at level error */
void ts__flush_dirty(ts_loop *loop);
/* Runs the function under `narg` args on L's top in a new task; a stream
 * as owner hears of the task's end (ts__stream_task_done). */
void ts__spawn(lua_State *L, int narg, void *owner);
void ts__stream_task_done(lua_State *L, ts_stream *s, lua_State *co, int status);
/* Runs a server's handler on s: handler is the registry ref of the
 * server's {server=, begin=, done=, Address=} table. */
void ts__serve(lua_State *L, ts_stream *s, int handler_ref, const char *host,
               int port, const char *family);
/* After fork: reinitializes the loop, if there is one, for the child. */
int ts__loop_fork(void);
int ts__loop_running(void);

/* process.c: a worker of fork_processes tells its supervisor it is ready
 * (called when its loop starts; does nothing elsewhere). */
void ts__worker_ready(void);

/* netutil.c: a listener takes a socket's fd, and gives it back closed. */
int ts__socket_take(lua_State *L, int idx, int *family);
void ts__socket_release(lua_State *L, int idx);

/* stream.c */
ts_stream *ts__stream_new(lua_State *L, int is_pipe);
uv_stream_t *ts__stream_handle(ts_stream *s);
void ts__stream_configure(ts_stream *s, size_t max_buffer, size_t chunk,
                          double timeout);
int ts__stream_start(ts_stream *s);
void ts__stream_push(lua_State *L, ts_stream *s);
void ts__stream_abort(ts_stream *s);
int ts__stream_flush(ts_stream *s);
const char *ts__errname(int uverr);
int ts__push_addr(lua_State *L, const struct sockaddr *sa);
int ts__addr_name(const struct sockaddr *sa, char *host, size_t len);

int ts__open_loop(lua_State *L);
int ts__open_stream(lua_State *L);
int ts__open_server(lua_State *L);
int ts__open_netutil(lua_State *L);
int ts__open_client(lua_State *L);
int ts__open_process(lua_State *L);
int ts__open_tls(lua_State *L);

#endif
