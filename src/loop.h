/* The loop context of one lua_State (loop.c): the libuv loop it runs on,
 * tasks (coroutines the loop resumes), the one way to park and wake a task,
 * timers, signals, hooks, logging and the collector's policy. */
#ifndef TS_LOOP_H
#define TS_LOOP_H

#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <uv.h>

#include "addr.h"
#include "buf.h"
#include "tcpserver.h"

typedef struct ts_loop ts_loop;
typedef void (*ts_hook)(ts_loop *loop);
typedef void (*ts_task_end)(lua_State *L, int status, void *owner);
/* A task is killed: what waits for something on its behalf lets go. */
typedef void (*ts_forget)(ts_loop *loop, lua_State *co);

#define TS_MAX_HOOKS 4

struct ts_loop {
  uv_loop_t *uv;
  lua_State *L; /* callbacks run here: the thread in start(), or
                   the main thread when the host runs the loop */
  int running;  /* start() is in uv_run */
  int parked;   /* the task being resumed waits on something */
  int log_ref;  /* Lua function(level, msg) for the core's logs */
  int nsettle, nstart;
  ts_hook settle[TS_MAX_HOOKS]; /* after each resume or callback */
  ts_hook start[TS_MAX_HOOKS];  /* once, when start() first runs */
  ts_hook close[TS_MAX_HOOKS];  /* the Lua state closes: free what is left */
  int nclose, nforget;
  int ndeadlines;                 /* tasks inside with_timeout: waits look theirs up */
  ts_forget forget[TS_MAX_HOOKS]; /* a task is killed (ts__kill) */
  void *streams;                  /* stream.c's per-loop state */
  void *sleepers;                 /* loop.c's sleeping tasks, a list */
  size_t ended;                   /* tasks ended since the last full collection */
  size_t walked;                  /* dead-thread walks since then (an upper bound) */
  size_t walk_budget;             /* walks that cost about one full collection */
  uv_prepare_t full_collect;
  ts_task_end task_end; /* see ts__spawn_owned */
};

/* The context of L's state, made on first use (on the host's loop if one
 * was given with ts_set_loop, else on libuv's default loop). */
ts_loop *ts__loop(lua_State *L);
/* The context, or NULL if none was made yet. */
ts_loop *ts__loop_find(lua_State *L);
/* After fork(): the inherited loop, if any, gets its own kernel state. */
int ts__loop_fork(lua_State *L);
void ts__loop_on_settle(ts_loop *loop, ts_hook fn);
void ts__loop_on_start(ts_loop *loop, ts_hook fn);
void ts__loop_on_forget(ts_loop *loop, ts_forget fn);
/* At lua_close, after every stream's __gc (the context is finalized last:
 * it was made first). The host must have closed servers and streams. */
void ts__loop_on_close(ts_loop *loop, ts_hook fn);

/* A delay in seconds given from Lua at idx, in ms (0 stays 0: the next
 * iteration); raises if it is negative or past 10^9 s. */
uint64_t ts__delay_ms(lua_State *L, int idx);
/* Seconds to a libuv timeout in ms; 0 means none: none was asked for, or
 * more than libuv can time (casting such a double is undefined). */
uint64_t ts__timeout_ms(double seconds);

/* ---- tasks ---- */

/* Runs the function under `narg` args on L's top in a new task, until it
 * first waits. */
void ts__spawn(lua_State *L, int narg);
/* As ts__spawn, for a task that serves `owner`, a C object whose first
 * member is its ts_loop * (and that outlives the task). When the task
 * returns or raises, the loop calls end(L, status, owner) instead of
 * logging: on an error, L holds the error and its traceback on top, and
 * the task's to-be-closed variables are closed. One end per loop: the
 * last one given. */
void ts__spawn_owned(lua_State *L, int narg, ts_loop **owner, ts_task_end end);
int ts__in_task(lua_State *L);
/* Whether task co was killed (core.kill): it is never resumed again. */
int ts__task_killed(lua_State *co);
/* ioloop.with_timeout: a wait of task L that would take `*ms` (0: no
 * limit) keeps L's deadline, if it has one. Returns 0 (*ms as it was), 1
 * (*ms cut to the deadline: expiring then is a "timeout"), or -1 (the
 * deadline has passed: the wait must not begin; it is a "timeout"). */
int ts__wait_limit(lua_State *L, uint64_t *ms);
/* Whether L is a task that may yield now: not inside a C function that
 * called back into Lua (table.sort's comparator, a gsub callback, a
 * metamethod, __gc), where lua_yield would raise. */
int ts__can_wait(lua_State *L);
/* Raises unless L can wait (see ts__can_wait); call it before a wait
 * registers anything, so that a refused wait leaves nothing behind. */
void ts__check_task(lua_State *L, const char *what);

/* A task parked until a callback wakes it: every wait in the core is one.
 * Use as `return ts_waiter_park(w, L);` from a lua_CFunction. */
typedef struct ts_waiter {
  lua_State *co;
  int ref; /* anchors co, or LUA_NOREF if the owner does */
} ts_waiter;

#define ts_waiter_waiting(w) ((w)->co != NULL)
void ts_waiter_init(ts_waiter *w);
int ts_waiter_park(ts_waiter *w, lua_State *L);
/* The bare form, for an owner that holds the task and keeps it alive
 * itself (a cheaper anchor than a ref): `return ts__park(L);` waits,
 * ts__wake resumes it with the `nres` values pushed on co. */
int ts__park(lua_State *L);
void ts__wake(lua_State *co, int nres);
/* Resumes the task with the `nres` values already pushed on w->co. */
void ts_waiter_wake(ts_waiter *w, int nres);
void ts_waiter_wake_error(ts_waiter *w, const char *err); /* nil, err */

/* ---- calling Lua from callbacks, and logs ---- */

/* Calls the function under `narg` args on loop->L, logging any error. */
void ts__pcall(ts_loop *loop, int narg);
/* The same on L, a thread of the loop's state. */
void ts__pcall_on(lua_State *L, ts_loop *loop, int narg);
void ts__log(ts_loop *loop, const char *level, const char *msg);
void ts__report(ts_loop *loop, const char *msg); /* at level error */

int ts__open_loop(lua_State *L);

#endif
