/* The per-process libuv loop, tasks (coroutines the loop resumes), timers
 * and signals. */
#include "internal.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ts_loop *the_loop;

/* A task that ends after the generational collector has aged it stays on
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
#define SENTINEL "tcpserver.gc_sentinel"
#define WALK_BUDGET_MIN 256

static void new_sentinel(lua_State *L) {
  lua_newuserdatauv(L, 0, 0);
  luaL_setmetatable(L, SENTINEL);
  lua_pop(L, 1);
}

/* The sentinel is collected too, so counting restarts first. */
static void full_collect_cb(uv_prepare_t *h) {
  lua_State *L = the_loop->L;
  size_t heap_kb;

  uv_prepare_stop(h);
  the_loop->ended = 0;
  the_loop->walked = 0;
  if (lua_gc(L, LUA_GCISRUNNING)) /* not if the script stopped it */
    lua_gc(L, LUA_GCCOLLECT);
  heap_kb = (size_t)lua_gc(L, LUA_GCCOUNT);
  the_loop->walk_budget = heap_kb > WALK_BUDGET_MIN ? heap_kb : WALK_BUDGET_MIN;
}

static int sentinel_gc(lua_State *L) {
  the_loop->walked += the_loop->ended;
  if (the_loop->walked >= the_loop->walk_budget)
    uv_prepare_start(&the_loop->full_collect, full_collect_cb);
  new_sentinel(L);
  return 0;
}

static void start_sentinel(lua_State *L) {
  uv_prepare_init(the_loop->uv, &the_loop->full_collect);
  uv_unref((uv_handle_t *)&the_loop->full_collect);
  luaL_newmetatable(L, SENTINEL);
  lua_pushcfunction(L, sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  new_sentinel(L);
  the_loop->walk_budget = WALK_BUDGET_MIN;
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

ts_loop *ts__loop(lua_State *L) {
  if (the_loop != NULL)
    return the_loop;
  the_loop = calloc(1, sizeof(*the_loop));
  if (the_loop == NULL)
    luaL_error(L, "tcpserver: out of memory");
  /* The default loop is created on first use, so a process may bind
   * sockets and fork before it exists. */
  the_loop->uv = uv_default_loop();
  the_loop->uv->data = the_loop;
  the_loop->log_ref = LUA_NOREF;
  the_loop->rbuf_budget = default_read_budget();
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  the_loop->L = lua_tothread(L, -1);
  lua_pop(L, 1);
  start_sentinel(L);
  signal(SIGPIPE, SIG_IGN);
  return the_loop;
}

/* In a forked child: the inherited loop gets its own kernel state. */
int ts__loop_fork(void) {
  return the_loop != NULL ? uv_loop_fork(the_loop->uv) : 0;
}

int ts__loop_running(void) {
  return the_loop != NULL && the_loop->running;
}

/* A task's extra space holds the loop's address, or the stream whose
 * handler it runs; other threads hold what the main thread has: NULL, set
 * when the module opens (threads created before that hold what Lua left
 * there, which is zero in practice but not by contract). */
void ts__mark_task(lua_State *co, void *owner) {
  *(void **)lua_getextraspace(co) = owner ? owner : the_loop;
}

int ts__in_task(lua_State *L) {
  return the_loop != NULL && *(void **)lua_getextraspace(L) != NULL;
}

void ts__check_task(lua_State *L, const char *what) {
  if (!ts__in_task(L))
    luaL_error(L, "%s: must be called from a coroutine run by the loop "
                  "(handle_stream, spawn_callback, run_sync or testing.async)",
               what);
}

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

void ts__pcall(ts_loop *loop, int narg) {
  ts__pcall_on(loop->L, narg);
}

void ts__pcall_on(lua_State *L, int narg) {
  ts_loop *loop = the_loop;
  int base = lua_gettop(L) - narg;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  if (lua_pcall(L, narg, 0, base) != LUA_OK) {
    ts__report(loop, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  ts__flush_dirty(loop);
}

int ts__park(lua_State *L) {
  the_loop->parked = 1;
  return lua_yield(L, 0);
}

static void resume_soon(lua_State *L, lua_State *co);

static void resume_from(lua_State *L, lua_State *co, int narg) {
  int nres, status, outer = the_loop->parked;
  void *owner;

  the_loop->parked = 0;
  status = lua_resume(co, L, narg, &nres);
  if (status == LUA_YIELD && !the_loop->parked) /* a bare coroutine.yield */
    resume_soon(L, co);
  the_loop->parked = outer; /* a task that resumes another runs on */
  owner = *(void **)lua_getextraspace(co);
  if (status != LUA_YIELD && owner != the_loop) {
    ts__stream_task_done(L, owner, co, status);
  } else if (status == LUA_OK || status == LUA_YIELD) {
    lua_pop(co, nres);
  } else {
    const char *msg = lua_tostring(co, -1);
    luaL_traceback(L, co, msg ? msg : "(error object)", 0);
    ts__report(the_loop, lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  ts__flush_dirty(the_loop);
  if (status != LUA_YIELD)
    the_loop->ended++;
}

void ts__resume(lua_State *co, int narg) {
  resume_from(the_loop->L, co, narg);
}

/* core.spawn(fn, ...): runs fn in a new task until it first waits. */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  ts__loop(L);
  ts__spawn(L, lua_gettop(L) - 1, NULL);
  return 0;
}

/* core.resume(co, ...): wakes a task that suspended itself with
 * coroutine.yield (Lua-level primitives such as locks.Event). */
static int l_resume(lua_State *L) {
  lua_State *co = lua_tothread(L, 1);
  int n = lua_gettop(L) - 1;

  luaL_argexpected(L, co != NULL && ts__in_task(co), 1, "suspended task");
  luaL_argcheck(L, lua_status(co) == LUA_YIELD, 1, "task is not suspended");
  lua_xmove(L, co, n);
  resume_from(L, co, n);
  return 0;
}

static int l_in_task(lua_State *L) {
  lua_pushboolean(L, ts__in_task(L));
  return 1;
}

static int l_start(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  lua_State *prev = loop->L;

  if (loop->running || ts__in_task(L))
    return luaL_error(L, "ioloop: the loop is already running");
  loop->running = 1;
  loop->L = L;
  /* A forked worker is ready once its loop runs (see fork_processes). */
  ts__worker_ready();
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
  lua_pushboolean(L, ts__loop(L)->running);
  return 1;
}

static int l_time(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e9);
  return 1;
}

/* core.read_budget([bytes]) -> budget, bytes held, streams holding them */
static int l_read_budget(lua_State *L) {
  ts_loop *loop = ts__loop(L);

  if (!lua_isnoneornil(L, 1)) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n > 0, 1, "budget must be a positive number of bytes");
    loop->rbuf_budget = (size_t)n;
  }
  lua_pushinteger(L, (lua_Integer)loop->rbuf_budget);
  lua_pushinteger(L, (lua_Integer)loop->rbuf_bytes);
  lua_pushinteger(L, (lua_Integer)loop->rbuf_count);
  return 3;
}

static int l_set_log_handler(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_unref(L, LUA_REGISTRYINDEX, loop->log_ref);
  lua_settop(L, 1);
  loop->log_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

/* ---- timers: one-shot or repeating, calling a Lua function ---- */

typedef struct ts_timer {
  uv_timer_t h;
  int fn_ref;
  int self_ref;
  int closed;
} ts_timer;

/* Past this many seconds, milliseconds no longer fit in a uint64_t. */
#define MAX_TIMEOUT_S 1.8e16

uint64_t ts__timeout_ms(double seconds) {
  if (!(seconds > 0) || seconds >= MAX_TIMEOUT_S)
    return 0;
  return seconds < 0.001 ? 1 : (uint64_t)(seconds * 1000 + 0.5);
}

static uint64_t to_ms(lua_State *L, int idx) {
  lua_Number s = luaL_checknumber(L, idx);
  luaL_argcheck(L, s >= 0 && s < 1e9, idx, "seconds out of range");
  return (uint64_t)(s * 1000 + 0.5);
}

static void timer_close_cb(uv_handle_t *h) {
  ts_timer *t = h->data;
  lua_State *L = the_loop->L;
  luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
}

static void timer_close(ts_timer *t) {
  if (t->closed)
    return;
  t->closed = 1;
  uv_close((uv_handle_t *)&t->h, timer_close_cb);
}

static void timer_cb(uv_timer_t *h) {
  ts_timer *t = h->data;
  ts_loop *loop = the_loop;

  lua_rawgeti(loop->L, LUA_REGISTRYINDEX, t->fn_ref);
  if (uv_timer_get_repeat(h) == 0)
    timer_close(t);
  ts__pcall(loop, 0);
}

/* core.timer(delay, repeat, fn) -> handle with :cancel() */
static int l_timer(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  uint64_t delay = to_ms(L, 1), repeat = to_ms(L, 2);
  ts_timer *t;

  luaL_checktype(L, 3, LUA_TFUNCTION);
  t = lua_newuserdatauv(L, sizeof(*t), 0);
  memset(t, 0, sizeof(*t));
  luaL_setmetatable(L, TS_TIMER_MT);
  uv_timer_init(loop->uv, &t->h);
  t->h.data = t;
  lua_pushvalue(L, 3);
  t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_start(&t->h, timer_cb, delay, repeat);
  return 1;
}

static int timer_cancel(lua_State *L) {
  ts_timer *t = luaL_checkudata(L, 1, TS_TIMER_MT);
  timer_close(t);
  return 0;
}

static int timer_active(lua_State *L) {
  ts_timer *t = luaL_checkudata(L, 1, TS_TIMER_MT);
  lua_pushboolean(L, !t->closed);
  return 1;
}

/* ---- sleep: a task waits on a timer ---- */

typedef struct sleeper {
  uv_timer_t h;
  lua_State *co;
  int co_ref;
} sleeper;

static void sleeper_free(uv_handle_t *h) {
  free(h->data);
}

static void sleeper_cb(uv_timer_t *h) {
  sleeper *s = h->data;
  lua_State *co = s->co;
  int ref = s->co_ref;

  uv_close((uv_handle_t *)h, sleeper_free);
  lua_pushboolean(co, 1);
  ts__resume(co, 1);
  luaL_unref(the_loop->L, LUA_REGISTRYINDEX, ref);
}

/* Wakes co after ms; L anchors it meanwhile. Returns 0 or -1 (ENOMEM). */
static int wake_after(lua_State *L, lua_State *co, uint64_t ms) {
  sleeper *s = malloc(sizeof(*s));

  if (s == NULL)
    return -1;
  uv_timer_init(the_loop->uv, &s->h);
  s->h.data = s;
  s->co = co;
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  s->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_start(&s->h, sleeper_cb, ms, 0);
  return 0;
}

/* A task that yields with coroutine.yield gives the others a turn: the
 * loop resumes it in its next iteration (with true), as sleep(0) would. */
static void resume_soon(lua_State *L, lua_State *co) {
  if (wake_after(L, co, 0) != 0)
    ts__report(the_loop, "coroutine.yield in a task: out of memory, the task is lost");
}

static int l_sleep(lua_State *L) {
  uint64_t ms = to_ms(L, 1);

  ts__loop(L);
  ts__check_task(L, "sleep");
  if (wake_after(L, L, ms) != 0)
    return luaL_error(L, "sleep: out of memory");
  return ts__park(L);
}

/* core.park(): suspends the task until core.resume wakes it (for waits
 * written in Lua, such as locks.Event). */
static int l_park(lua_State *L) {
  ts__check_task(L, "park");
  return ts__park(L);
}

/* ---- signals: handlers that do not keep the loop alive ---- */

typedef struct ts_signal {
  uv_signal_t h;
  int fn_ref;
} ts_signal;

static void signal_cb(uv_signal_t *h, int signum) {
  ts_signal *s = h->data;
  lua_rawgeti(the_loop->L, LUA_REGISTRYINDEX, s->fn_ref);
  lua_pushinteger(the_loop->L, signum);
  ts__pcall(the_loop, 1);
}

static int l_signal(lua_State *L) {
  static const char *const names[] = {"SIGINT", "SIGTERM", "SIGHUP",
                                      "SIGUSR1", "SIGUSR2", NULL};
  static const int nums[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2};
  ts_loop *loop = ts__loop(L);
  int signum = nums[luaL_checkoption(L, 1, NULL, names)];
  ts_signal *s;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  /* Never freed: a handler lives as long as the process. */
  s = malloc(sizeof(*s));
  if (s == NULL)
    return luaL_error(L, "signal: out of memory");
  uv_signal_init(loop->uv, &s->h);
  s->h.data = s;
  lua_pushvalue(L, 2);
  s->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_signal_start(&s->h, signal_cb, signum);
  uv_unref((uv_handle_t *)&s->h);
  return 0;
}

static void create_timer_meta(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};
  luaL_newmetatable(L, TS_TIMER_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

int ts__open_loop(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"spawn", l_spawn},     {"in_task", l_in_task}, {"start", l_start},
    {"resume", l_resume},   {"park", l_park},
    {"stop", l_stop},       {"running", l_running}, {"time", l_time},
    {"timer", l_timer},     {"sleep", l_sleep},     {"signal", l_signal},
    {"set_log_handler", l_set_log_handler},  {"read_budget", l_read_budget},     {NULL, NULL}};
  create_timer_meta(L);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}

/* Runs the function under `narg` args on L's top in a new task. */
void ts__spawn(lua_State *L, int narg, void *owner) {
  lua_State *co = lua_newthread(L);
  ts__mark_task(co, owner);
  lua_insert(L, -(narg + 2));
  lua_xmove(L, co, narg + 1);
  resume_from(L, co, narg);
  lua_pop(L, 1);
}
