/* Timers and signal handlers handed to Lua: core.timer(delay, repeat, fn)
 * and core.signal(name, fn), each a handle with :cancel(). They run their
 * function as a callback of the loop (loop.c's ts__pcall). */
#include "timer.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

/* ---- timers: one-shot or repeating, calling a Lua function ---- */

#define TIMER_MT "tcpserver.timer"

typedef struct ts_timer {
  uv_timer_t h;
  ts_loop *loop;
  int fn_ref;
  int self_ref;
  int closed;
} ts_timer;

static void timer_close_cb(uv_handle_t *h) {
  ts_timer *t = h->data;
  lua_State *L = t->loop->L;
  luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);
}

static void timer_close(ts_timer *t) {
  if (t->closed)
    return;
  t->closed = 1;
  uv_close((uv_handle_t *)&t->h, timer_close_cb);
}

static void timer_fire(uv_timer_t *h) {
  ts_timer *t = h->data;

  lua_rawgeti(t->loop->L, LUA_REGISTRYINDEX, t->fn_ref);
  if (uv_timer_get_repeat(h) == 0)
    timer_close(t);
  ts__pcall(t->loop, 0);
}

/* core.timer(delay, repeat, fn) -> handle with :cancel() */
static int l_timer(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  uint64_t delay = ts__delay_ms(L, 1), repeat = ts__delay_ms(L, 2);
  ts_timer *t;

  luaL_checktype(L, 3, LUA_TFUNCTION);
  t = lua_newuserdatauv(L, sizeof(*t), 0);
  memset(t, 0, sizeof(*t));
  luaL_setmetatable(L, TIMER_MT);
  uv_timer_init(loop->uv, &t->h);
  t->h.data = t;
  t->loop = loop;
  lua_pushvalue(L, 3);
  t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_start(&t->h, timer_fire, delay, repeat);
  return 1;
}

static int timer_cancel(lua_State *L) {
  timer_close(luaL_checkudata(L, 1, TIMER_MT));
  return 0;
}

static int timer_active(lua_State *L) {
  ts_timer *t = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushboolean(L, !t->closed);
  return 1;
}

/* ---- signals: handlers that do not keep the loop alive ----
 *
 * A handler may be cancelled (the loop's default SIGINT/SIGTERM handlers
 * are, when it returns). libuv then resets the signal to SIG_DFL, which
 * under plain lua5.4 would drop the interpreter's own SIGINT handler (an
 * "interrupted!" error, or a kill when it is not running a chunk): the
 * disposition found before our first handler comes back instead. */

#define TS_SIGNAL_MT "tcpserver.signal"
#define NSIG_MAX 65

typedef struct ts_signal {
  uv_signal_t h;
  ts_loop *loop;
  int fn_ref, self_ref;
  int closed;
} ts_signal;

static int active[NSIG_MAX];              /* our running handlers, by signal */
static struct sigaction before[NSIG_MAX]; /* the disposition they replaced */

static void signal_cb(uv_signal_t *h, int signum) {
  ts_signal *s = h->data;
  lua_rawgeti(s->loop->L, LUA_REGISTRYINDEX, s->fn_ref);
  lua_pushinteger(s->loop->L, signum);
  ts__pcall(s->loop, 1);
}

static void signal_close_cb(uv_handle_t *h) {
  ts_signal *s = h->data;
  luaL_unref(s->loop->L, LUA_REGISTRYINDEX, s->fn_ref);
  luaL_unref(s->loop->L, LUA_REGISTRYINDEX, s->self_ref);
}

/* core.signal(name, fn) -> handle with :cancel() */
static int l_signal(lua_State *L) {
  static const char *const names[] = {"SIGINT",  "SIGTERM", "SIGHUP",
                                      "SIGUSR1", "SIGUSR2", NULL};
  static const int nums[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2};
  ts_loop *loop = ts__loop(L);
  int signum = nums[luaL_checkoption(L, 1, NULL, names)];
  ts_signal *s;

  luaL_checktype(L, 2, LUA_TFUNCTION);
  s = lua_newuserdatauv(L, sizeof(*s), 0);
  memset(s, 0, sizeof(*s));
  luaL_setmetatable(L, TS_SIGNAL_MT);
  uv_signal_init(loop->uv, &s->h);
  s->h.data = s;
  s->loop = loop;
  lua_pushvalue(L, 2);
  s->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX); /* until cancelled */
  if (active[signum]++ == 0)
    sigaction(signum, NULL, &before[signum]);
  uv_signal_start(&s->h, signal_cb, signum);
  uv_unref((uv_handle_t *)&s->h);
  return 1;
}

static int signal_cancel(lua_State *L) {
  ts_signal *s = luaL_checkudata(L, 1, TS_SIGNAL_MT);
  int signum = s->h.signum;

  if (s->closed)
    return 0;
  s->closed = 1;
  uv_close((uv_handle_t *)&s->h, signal_close_cb); /* stops it at once */
  if (--active[signum] == 0)
    sigaction(signum, &before[signum], NULL);
  return 0;
}

static void create_signal_meta(lua_State *L) {
  static const luaL_Reg methods[] = {{"cancel", signal_cancel}, {NULL, NULL}};
  luaL_newmetatable(L, TS_SIGNAL_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

static void create_timer_meta(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};
  luaL_newmetatable(L, TIMER_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

int ts__open_timer(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"timer", l_timer}, {"signal", l_signal}, {NULL, NULL}};

  create_timer_meta(L);
  create_signal_meta(L);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
