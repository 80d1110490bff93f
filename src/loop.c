/* The loop context of a lua_State: tasks, waiters, timers, signals, hooks
 * and the collector's policy. One context per state, kept in its registry
 * (as luv keeps its ctx), so that two states, or a host that runs its own
 * libuv loop, each have theirs. */
#include "loop.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Registry keys: the context, and a loop the host handed over. */
static const char loop_key = 'L';
static const char host_loop_key = 'H';

#define SENTINEL_MT "tcpserver.gc_sentinel"
#define LOOP_MT "tcpserver.loop"
#define WALK_BUDGET_MIN 256
/* Past this many seconds, milliseconds no longer fit in a uint64_t. */
#define MAX_TIMEOUT_S 1.8e16

uint64_t ts__timeout_ms(double seconds) {
  if (!(seconds > 0) || seconds >= MAX_TIMEOUT_S)
    return 0;
  return seconds < 0.001 ? 1 : (uint64_t)(seconds * 1000 + 0.5);
}

/* ---- the collector's policy ----
 * A task that ends after the generational collector has aged it stays on
 * its gray list, and every minor collection walks it again until a major
 * one; Lua starts a major collection only once the heap has doubled, which
 * after a wave of closed connections may be never (bulk transfer then ran
 * at half speed). So the core counts that waste: a finalizer-only sentinel,
 * made anew each time it is collected, adds the tasks ended since the last
 * full collection at every cycle. Once the walks add up to what a full
 * collection of the heap costs (a thread walk is about as dear as marking
 * a KiB), it runs one: never more than twice the least work, and nothing
 * at all while no task ends. It runs from a prepare handle, after the
 * close callbacks have let go of the streams whose tasks ended. */

static void new_sentinel(lua_State *L, ts_loop *loop) {
  *(ts_loop **)lua_newuserdatauv(L, sizeof(loop), 0) = loop;
  luaL_setmetatable(L, SENTINEL_MT);
  lua_pop(L, 1);
}

/* The sentinel is collected too, so counting restarts first. */
static void full_collect_cb(uv_prepare_t *h) {
  ts_loop *loop = h->data;
  lua_State *L = loop->L;
  size_t heap_kb;

  uv_prepare_stop(h);
  loop->ended = 0;
  loop->walked = 0;
  if (lua_gc(L, LUA_GCISRUNNING)) /* not if the script stopped it */
    lua_gc(L, LUA_GCCOLLECT);
  heap_kb = (size_t)lua_gc(L, LUA_GCCOUNT);
  loop->walk_budget = heap_kb > WALK_BUDGET_MIN ? heap_kb : WALK_BUDGET_MIN;
}

static int sentinel_gc(lua_State *L) {
  ts_loop *loop = *(ts_loop **)lua_touserdata(L, 1);

  loop->walked += loop->ended;
  if (loop->walked >= loop->walk_budget)
    uv_prepare_start(&loop->full_collect, full_collect_cb);
  new_sentinel(L, loop);
  return 0;
}

static void start_sentinel(lua_State *L, ts_loop *loop) {
  uv_prepare_init(loop->uv, &loop->full_collect);
  loop->full_collect.data = loop;
  uv_unref((uv_handle_t *)&loop->full_collect);
  luaL_newmetatable(L, SENTINEL_MT);
  lua_pushcfunction(L, sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  new_sentinel(L, loop);
  loop->walk_budget = WALK_BUDGET_MIN;
}

/* ---- the context ---- */

static void loop_free(uv_handle_t *h) {
  free(h->data);
}

/* The state is closing: libuv lets go of the context's handle later. */
static int loop_gc(lua_State *L) {
  ts_loop *loop = *(ts_loop **)lua_touserdata(L, 1);
  int i;

  for (i = 0; i < loop->nclose; i++)
    loop->close[i](loop);
  uv_close((uv_handle_t *)&loop->full_collect, loop_free);
  return 0;
}

ts_loop *ts__loop_find(lua_State *L) {
  ts_loop *loop;

  lua_rawgetp(L, LUA_REGISTRYINDEX, &loop_key);
  loop = lua_isuserdata(L, -1) ? *(ts_loop **)lua_touserdata(L, -1) : NULL;
  lua_pop(L, 1);
  return loop;
}

ts_loop *ts__loop(lua_State *L) {
  ts_loop *loop = ts__loop_find(L);

  if (loop != NULL)
    return loop;
  loop = calloc(1, sizeof(*loop));
  if (loop == NULL)
    luaL_error(L, "tcpserver: out of memory");
  /* libuv's default loop is made on first use, so a process may bind
   * sockets and fork before it exists. */
  lua_rawgetp(L, LUA_REGISTRYINDEX, &host_loop_key);
  loop->uv = lua_isuserdata(L, -1) ? lua_touserdata(L, -1) : uv_default_loop();
  lua_pop(L, 1);
  loop->log_ref = LUA_NOREF;
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  loop->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  *(ts_loop **)lua_newuserdatauv(L, sizeof(loop), 0) = loop;
  luaL_newmetatable(L, LOOP_MT);
  lua_pushcfunction(L, loop_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &loop_key);
  start_sentinel(L, loop);
  signal(SIGPIPE, SIG_IGN);
  return loop;
}

int ts_set_loop(lua_State *L, uv_loop_t *uv) {
  if (ts__loop_find(L) != NULL)
    return -1; /* too late: the core already runs on a loop */
  lua_pushlightuserdata(L, uv);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &host_loop_key);
  return 0;
}

uv_loop_t *ts_get_loop(lua_State *L) {
  return ts__loop(L)->uv;
}

int ts__loop_fork(lua_State *L) {
  ts_loop *loop = ts__loop_find(L);
  return loop != NULL ? uv_loop_fork(loop->uv) : 0;
}

static void add_hook(ts_hook *hooks, int *n, ts_hook fn) {
  int i;

  for (i = 0; i < *n; i++) {
    if (hooks[i] == fn)
      return;
  }
  if (*n < TS_MAX_HOOKS)
    hooks[(*n)++] = fn;
}

void ts__loop_on_settle(ts_loop *loop, ts_hook fn) {
  add_hook(loop->settle, &loop->nsettle, fn);
}

void ts__loop_on_start(ts_loop *loop, ts_hook fn) {
  add_hook(loop->start, &loop->nstart, fn);
}

void ts__loop_on_close(ts_loop *loop, ts_hook fn) {
  add_hook(loop->close, &loop->nclose, fn);
}

void ts__loop_on_forget(ts_loop *loop, ts_forget fn) {
  int i;

  for (i = 0; i < loop->nforget; i++) {
    if (loop->forget[i] == fn)
      return;
  }
  if (loop->nforget < TS_MAX_HOOKS)
    loop->forget[loop->nforget++] = fn;
}

static void settle(ts_loop *loop) {
  int i;

  for (i = 0; i < loop->nsettle; i++)
    loop->settle[i](loop);
}

/* ---- logs and calls from callbacks ---- */

void ts__log(ts_loop *loop, const char *level, const char *msg) {
  lua_State *L = loop->L;
  if (loop->log_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, loop->log_ref);
    lua_pushstring(L, level);
    lua_pushstring(L, msg);
    if (lua_pcall(L, 2, 0, 0) == LUA_OK)
      return;
    lua_pop(L, 1);
  }
  fprintf(stderr, "tcpserver: %s: %s\n", level, msg ? msg : "(error object)");
}

void ts__report(ts_loop *loop, const char *msg) {
  ts__log(loop, "error", msg);
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL)
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* Calls the function under `narg` args on L, logging an error with its
 * traceback. */
void ts__pcall_on(lua_State *L, ts_loop *loop, int narg) {
  int base = lua_gettop(L) - narg;

  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  if (lua_pcall(L, narg, 0, base) != LUA_OK) {
    ts__report(loop, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  settle(loop);
}

void ts__pcall(ts_loop *loop, int narg) {
  ts__pcall_on(loop->L, loop, narg);
}

/* ---- tasks ----
 * A task's extra space holds its loop, or for a task with an owner
 * (ts__spawn_owned) the owner with the low bit set: an owner starts with
 * its ts_loop *, and is aligned, so that bit is free. Other threads hold
 * what the main thread has: NULL, set when the module opens (threads made
 * before that hold what Lua left there, zero in practice but not by
 * contract). */
#define OWNED_BIT ((uintptr_t)1)
#define KILLED_BIT ((uintptr_t)2) /* core.kill: never resumed again */
_Static_assert(LUA_EXTRASPACE >= sizeof(uintptr_t), "a task's word fits its extra space");
_Static_assert(_Alignof(ts_loop *) > (OWNED_BIT | KILLED_BIT) &&
                   _Alignof(ts_loop) > (OWNED_BIT | KILLED_BIT),
               "an owner (whose first member is a ts_loop *) and a loop are aligned, "
               "so OWNED_BIT and KILLED_BIT are free in their addresses");

static uintptr_t extra_word(lua_State *co) {
  uintptr_t w;
  memcpy(&w, lua_getextraspace(co), sizeof w);
  return w;
}

static void set_extra_word(lua_State *co, uintptr_t w) {
  memcpy(lua_getextraspace(co), &w, sizeof w);
}

static ts_loop *task_loop(lua_State *co) {
  uintptr_t w = extra_word(co) & ~KILLED_BIT;
  return (w & OWNED_BIT) ? *(ts_loop **)(w & ~OWNED_BIT) : (ts_loop *)w;
}

int ts__task_killed(lua_State *co) {
  return (extra_word(co) & KILLED_BIT) != 0;
}

int ts__in_task(lua_State *L) {
  return task_loop(L) != NULL;
}

int ts__can_wait(lua_State *L) {
  return task_loop(L) != NULL && lua_isyieldable(L);
}

void ts__check_task(lua_State *L, const char *what) {
  if (!ts__in_task(L))
    luaL_error(L,
               "%s: must be called from a coroutine run by the loop "
               "(handle_stream, spawn_callback, run_sync or testing.async)",
               what);
  if (!lua_isyieldable(L))
    luaL_error(L,
               "%s: cannot wait here: attempt to yield across a C-call boundary "
               "(inside a metamethod, __gc, or a function that a C function such as "
               "table.sort or string.gsub calls)",
               what);
}

static void resume_soon(ts_loop *loop, lua_State *co);

#if LUA_VERSION_RELEASE_NUM >= 50406
#define close_thread(co, L) lua_closethread(co, L)
#else
#define close_thread(co, L) lua_resetthread(co)
#endif

/* A task that raised: its error and the traceback from where it was
 * raised go on L, then its pending to-be-closed variables are closed, as
 * a protected call would have done while unwinding. Closing returns the
 * task's error again, or a new one raised by a __close, which is logged. */
static void take_error(lua_State *L, lua_State *co) {
  const char *msg = lua_tostring(co, -1);

  luaL_checkstack(L, 3, NULL);
  luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
  if (!lua_checkstack(co, 1)) { /* a stack overflow: nothing is left to close */
    lua_xmove(co, L, 1);
    lua_insert(L, -2);
    return;
  }
  lua_pushvalue(co, -1);
  lua_xmove(co, L, 1);
  lua_insert(L, -2); /* err, traceback */
  if (close_thread(co, L) != LUA_OK) {
    lua_xmove(co, L, 1);
    if (!lua_rawequal(L, -1, -3)) {
      msg = lua_tostring(L, -1);
      ts__report(task_loop(co), msg ? msg : "(error object of a __close)");
    }
    lua_pop(L, 1);
  }
}

static void resume_from(lua_State *L, lua_State *co, int narg) {
  ts_loop *loop = task_loop(co);
  int nres, status, outer = loop->parked;

  if (extra_word(co) & KILLED_BIT) { /* a wait it was in ended after all */
    lua_settop(co, 0);
    return;
  }

  loop->parked = 0;
  status = lua_resume(co, L, narg, &nres);
  if (status == LUA_YIELD && !loop->parked) /* a bare coroutine.yield */
    resume_soon(loop, co);
  loop->parked = outer; /* a task that resumed another runs on */
  if (status == LUA_OK || status == LUA_YIELD)
    lua_pop(co, nres);
  else
    take_error(L, co);
  if (status != LUA_YIELD && (extra_word(co) & OWNED_BIT)) {
    loop->task_end(L, status, (void *)(extra_word(co) & ~OWNED_BIT));
    set_extra_word(co, (uintptr_t)loop); /* the owner may go now */
  } else if (status != LUA_OK && status != LUA_YIELD) {
    ts__report(loop, lua_tostring(L, -1));
    lua_pop(L, 2);
  }
  settle(loop);
  if (status != LUA_YIELD)
    loop->ended++;
}

/* Resumes task co with `narg` values on its stack, from a callback. */
static void resume_task(lua_State *co, int narg) {
  resume_from(task_loop(co)->L, co, narg);
}

static void spawn(lua_State *L, int narg, uintptr_t extra) {
  lua_State *co = lua_newthread(L);

  set_extra_word(co, extra);
  lua_insert(L, -(narg + 2));
  lua_xmove(L, co, narg + 1);
  resume_from(L, co, narg);
  lua_pop(L, 1);
}

void ts__spawn(lua_State *L, int narg) {
  spawn(L, narg, (uintptr_t)ts__loop(L));
}

void ts__spawn_owned(lua_State *L, int narg, ts_loop **owner, ts_task_end end) {
  (*owner)->task_end = end;
  spawn(L, narg, (uintptr_t)owner | OWNED_BIT);
}

/* ---- waiters ---- */

void ts_waiter_init(ts_waiter *w) {
  w->co = NULL;
  w->ref = LUA_NOREF;
}

int ts__park(lua_State *L) {
  task_loop(L)->parked = 1;
  return lua_yield(L, 0);
}

void ts__wake(lua_State *co, int nres) {
  resume_task(co, nres);
}

int ts_waiter_park(ts_waiter *w, lua_State *L) {
  lua_pushthread(L);
  w->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  w->co = L;
  return ts__park(L);
}

/* The anchor goes after the resume: the task may have parked again on
 * this waiter, with a new one. */
void ts_waiter_wake(ts_waiter *w, int nres) {
  lua_State *co = w->co;
  int ref = w->ref;

  w->co = NULL;
  w->ref = LUA_NOREF;
  resume_task(co, nres);
  luaL_unref(co, LUA_REGISTRYINDEX, ref);
}

void ts_waiter_wake_error(ts_waiter *w, const char *err) {
  lua_pushnil(w->co);
  lua_pushstring(w->co, err);
  ts_waiter_wake(w, 2);
}

/* ---- sleep: a task waits on a timer ---- */

typedef struct sleeper {
  uv_timer_t h;
  ts_waiter w;
  int cut;                     /* by a deadline: it ends in "timeout" */
  struct sleeper *prev, *next; /* the loop's sleepers (a killed task's go) */
  ts_loop *loop;
} sleeper;

static void sleeper_free(uv_handle_t *h) {
  free(h->data);
}

static void unlink_sleeper(sleeper *s) {
  if (s->prev != NULL)
    s->prev->next = s->next;
  else
    s->loop->sleepers = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
}

/* A killed task's sleeps end now: their timers would keep the loop
 * running, and the task referenced, until they fired. */
static void forget_sleeps(ts_loop *loop, lua_State *co) {
  sleeper *s = loop->sleepers, *next;

  for (; s != NULL; s = next) {
    next = s->next;
    if (s->w.co != co)
      continue;
    unlink_sleeper(s);
    luaL_unref(loop->L, LUA_REGISTRYINDEX, s->w.ref);
    ts_waiter_init(&s->w);
    uv_close((uv_handle_t *)&s->h, sleeper_free);
  }
}

static void sleeper_cb(uv_timer_t *h) {
  sleeper *s = h->data;

  unlink_sleeper(s);
  uv_close((uv_handle_t *)h, sleeper_free);
  if (s->cut) {
    ts_waiter_wake_error(&s->w, "timeout");
    return;
  }
  lua_pushboolean(s->w.co, 1);
  ts_waiter_wake(&s->w, 1);
}

static sleeper *new_sleeper(ts_loop *loop, uint64_t ms) {
  sleeper *s = malloc(sizeof(*s));

  if (s == NULL)
    return NULL;
  uv_timer_init(loop->uv, &s->h);
  s->h.data = s;
  s->cut = 0;
  s->loop = loop;
  s->prev = NULL;
  s->next = loop->sleepers;
  if (s->next != NULL)
    s->next->prev = s;
  loop->sleepers = s;
  ts_waiter_init(&s->w);
  uv_timer_start(&s->h, sleeper_cb, ms, 0);
  if (loop->nforget == 0 || loop->forget[0] != forget_sleeps)
    ts__loop_on_forget(loop, forget_sleeps);
  return s;
}

/* A task that yields with coroutine.yield gives the others a turn: the
 * loop resumes it in its next iteration (with true), as sleep(0) would. */
static void resume_soon(ts_loop *loop, lua_State *co) {
  sleeper *s = new_sleeper(loop, 0);

  if (s == NULL) {
    ts__report(loop, "coroutine.yield in a task: out of memory, the task is lost");
    return;
  }
  s->w.co = co;
  lua_pushthread(co);
  s->w.ref = luaL_ref(co, LUA_REGISTRYINDEX);
}

/* A delay given from Lua: 0 stays 0 (the next iteration). */
uint64_t ts__delay_ms(lua_State *L, int idx) {
  lua_Number s = luaL_checknumber(L, idx);
  luaL_argcheck(L, s >= 0 && s < 1e9, idx, "seconds out of range");
  return ts__timeout_ms(s);
}

static int l_sleep(lua_State *L) {
  uint64_t ms = ts__delay_ms(L, 1), limit = ms > 0 ? ms : 1;
  int cut;
  sleeper *s;

  ts__check_task(L, "sleep");
  if ((cut = ts__wait_limit(L, &limit)) < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  s = new_sleeper(task_loop(L), cut ? limit : ms);
  if (s == NULL)
    return luaL_error(L, "sleep: out of memory");
  s->cut = cut;
  return ts_waiter_park(&s->w, L);
}

/* The tasks parked by core.park, which only core.resume may wake (a task
 * waiting in a read or a sleep has its waiter; waking it twice is wrong). */
static const char parked_key = 'P';

/* Pushes the registry's weak-keyed table at key, made on first use. */
static void push_weak_table(lua_State *L, const void *key) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_rawsetp(L, LUA_REGISTRYINDEX, key);
  }
}

static void push_parked(lua_State *L) {
  push_weak_table(L, &parked_key);
}

/* core.park(): suspends the task until core.resume wakes it (for waits
 * written in Lua, such as locks.Event). */
static int l_park(lua_State *L) {
  ts__check_task(L, "park");
  push_parked(L);
  lua_pushthread(L);
  lua_pushboolean(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  task_loop(L)->parked = 1;
  return lua_yield(L, 0);
}

/* core.spawn(fn, ...): runs fn in a new task until it first waits. */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  ts__spawn(L, lua_gettop(L) - 1);
  return 0;
}

/* core.resume(co, ...): wakes a task that parked itself with core.park. */
static int l_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  int n = lua_gettop(L) - 1;

  luaL_argexpected(L, co != NULL && ts__in_task(co), 1, "suspended task");
  if (ts__task_killed(co)) /* woken after all: it is gone */
    return 0;
  luaL_argcheck(L, lua_status(co) == LUA_YIELD, 1, "task is not suspended");
  push_parked(L);
  lua_pushvalue(L, 1);
  luaL_argcheck(L, lua_rawget(L, -2) == LUA_TBOOLEAN, 1,
                "task is not parked by core.park");
  lua_pop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  lua_xmove(L, co, n);
  resume_from(L, co, n);
  return 0;
}

/* ---- deadlines (ioloop.with_timeout) ----
 * A task's deadline (core.time() seconds) is kept in a registry table by
 * thread, and loop->ndeadlines counts the tasks that have one: a wait
 * pays one test while no task has one. */
static const char deadlines_key = 'T';

static void push_deadlines(lua_State *L) {
  push_weak_table(L, &deadlines_key);
}

static double now_seconds(void) {
  return (double)uv_hrtime() / 1e9;
}

int ts__wait_limit(lua_State *L, uint64_t *ms) {
  ts_loop *loop = task_loop(L);
  double deadline, left;
  uint64_t left_ms;

  if (loop == NULL || loop->ndeadlines == 0)
    return 0;
  push_deadlines(L);
  lua_pushthread(L);
  deadline = lua_rawget(L, -2) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
  lua_pop(L, 2);
  if (deadline == 0)
    return 0;
  left = deadline - now_seconds();
  if (left <= 0)
    return -1;
  if (left > 1e9) /* beyond what a timer takes: none */
    return 0;
  left_ms = ts__timeout_ms(left);
  if (*ms != 0 && *ms <= left_ms)
    return 0;
  *ms = left_ms;
  return 1;
}

/* core.deadline() -> the running task's deadline, or nil */
static int l_deadline(lua_State *L) {
  push_deadlines(L);
  lua_pushthread(L);
  lua_rawget(L, -2);
  return 1;
}

/* core.set_deadline(seconds | nil): the running task's (core.time() clock) */
static int l_set_deadline(lua_State *L) {
  ts_loop *loop;
  int had;

  loop = task_loop(L); /* a killed task's close may run this: no yield check */
  if (loop == NULL)
    return luaL_error(L, "with_timeout: must be called from a task");
  if (!lua_isnil(L, 1))
    luaL_checknumber(L, 1);
  push_deadlines(L);
  lua_pushthread(L);
  had = lua_rawget(L, -2) != LUA_TNIL;
  lua_pop(L, 1);
  lua_pushthread(L);
  lua_pushvalue(L, 1);
  lua_rawset(L, -3);
  loop->ndeadlines += (lua_isnil(L, 1) ? 0 : 1) - had;
  return 0;
}

/* core.kill(co) -> true, or false if it is not waiting (done, or not yet
 * started): co is never resumed again, what waits on its behalf lets go
 * (the loop's forget hooks: a stream's reader and writers), and its
 * pending to-be-closed variables are closed. */
static int l_kill(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  ts_loop *loop;
  int i;

  luaL_argexpected(L, co != NULL && ts__in_task(co), 1, "task");
  if (co == L)
    return luaL_error(L, "kill: a task cannot kill itself (return from it instead)");
  luaL_argcheck(L, !(extra_word(co) & OWNED_BIT), 1, "a server's handler task");
  if (lua_status(co) != LUA_YIELD || ts__task_killed(co)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  loop = task_loop(co);
  set_extra_word(co, extra_word(co) | KILLED_BIT);
  for (i = 0; i < loop->nforget; i++)
    loop->forget[i](loop, co);
  if (close_thread(co, L) != LUA_OK) { /* a __close raised */
    const char *msg = lua_tostring(co, -1);
    ts__report(loop, msg ? msg : "(error object of a __close)");
  }
  lua_settop(co, 0);
  loop->ended++;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_in_task(lua_State *L) {
  lua_pushboolean(L, ts__in_task(L));
  return 1;
}

/* ---- running ---- */

static int l_start(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  lua_State *prev = loop->L;
  int i, n = loop->nstart;

  if (loop->running || ts__in_task(L))
    return luaL_error(L, "ioloop: the loop is already running");
  loop->running = 1;
  loop->L = L;
  loop->nstart = 0; /* each hook runs once */
  for (i = 0; i < n; i++)
    loop->start[i](loop);
  uv_run(loop->uv, UV_RUN_DEFAULT);
  loop->running = 0;
  loop->L = prev;
  return 0;
}

static int l_stop(lua_State *L) {
  uv_stop(ts__loop(L)->uv);
  return 0;
}

static int l_running(lua_State *L) {
  ts_loop *loop = ts__loop_find(L);
  lua_pushboolean(L, loop != NULL && loop->running);
  return 1;
}

static int l_time(lua_State *L) {
  lua_pushnumber(L, now_seconds());
  return 1;
}

static int l_set_log_handler(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, loop->log_ref);
  lua_settop(L, 1);
  loop->log_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

int ts__open_loop(lua_State *L) {
  static const luaL_Reg funcs[] = {{"spawn", l_spawn},
                                   {"in_task", l_in_task},
                                   {"start", l_start},
                                   {"resume", l_resume},
                                   {"kill", l_kill},
                                   {"deadline", l_deadline},
                                   {"set_deadline", l_set_deadline},
                                   {"park", l_park},
                                   {"stop", l_stop},
                                   {"running", l_running},
                                   {"time", l_time},
                                   {"sleep", l_sleep},
                                   {"set_log_handler", l_set_log_handler},
                                   {NULL, NULL}};
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
