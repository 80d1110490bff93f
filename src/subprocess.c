/* Subprocess: a child process run with uv_spawn, with our streams on its
 * pipes; a task may wait for its exit. */
#include "subprocess.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define TS_PROCESS_MT "tcpserver.subprocess"

typedef struct ts_process {
  uv_process_t h;
  ts_loop *loop;
  ts_waiter exit_waiter;
  int self_ref;
  int exited, closed;
  int64_t status;
  int term_signal;
} ts_process;

static void process_closed(uv_handle_t *h) {
  ts_process *p = h->data;
  luaL_unref(p->loop->L, LUA_REGISTRYINDEX, p->self_ref);
}

static void exit_cb(uv_process_t *h, int64_t status, int term_signal) {
  ts_process *p = h->data;

  p->exited = 1;
  p->status = status;
  p->term_signal = term_signal;
  p->closed = 1;
  uv_close((uv_handle_t *)h, process_closed);
  if (ts_waiter_waiting(&p->exit_waiter)) {
    lua_pushinteger(p->exit_waiter.co, status);
    lua_pushinteger(p->exit_waiter.co, term_signal);
    ts_waiter_wake(&p->exit_waiter, 2);
  }
}

/* Builds a NULL-terminated array of the strings in table `idx` on a
 * userdata left on the stack (freed by the GC). */
static char **string_array(lua_State *L, int idx, const char *what) {
  lua_Integer n = luaL_len(L, idx), i;
  char **v = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 1);
  lua_pushvalue(L, idx); /* keeps the strings alive with the array */
  lua_setiuservalue(L, -2, 1);
  for (i = 1; i <= n; i++) {
    if (lua_geti(L, idx, i) != LUA_TSTRING)
      luaL_error(L, "Subprocess: %s[%d] is not a string", what, (int)i);
    v[i - 1] = (char *)lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  v[n] = NULL;
  return v;
}

/* Sets up stdio slot `fd`: "pipe" gives a stream, nil inherits, "null"
 * leaves it closed. Pushes the stream or nil. */
static void setup_stdio(lua_State *L, uv_stdio_container_t *c, int fd, const char *mode,
                        int child_reads) {
  ts_stream *s;

  if (mode == NULL) {
    c->flags = UV_INHERIT_FD;
    c->data.fd = fd;
    lua_pushnil(L);
  } else if (strcmp(mode, "pipe") == 0) {
    s = ts__stream_new(L, 1);
    c->flags = UV_CREATE_PIPE | (child_reads ? UV_READABLE_PIPE : UV_WRITABLE_PIPE);
    c->data.stream = ts__stream_handle(s);
  } else if (strcmp(mode, "null") == 0) {
    c->flags = UV_IGNORE;
    lua_pushnil(L);
  } else {
    luaL_error(L, "Subprocess: stdio mode must be \"pipe\", \"null\" or nil");
  }
}

static void close_stream_at(lua_State *L, int idx) {
  if (lua_isnil(L, idx))
    return;
  lua_getfield(L, idx, "close");
  lua_pushvalue(L, idx);
  lua_call(L, 1, 0);
}

/* core.spawn_process(argv, stdin, stdout, stderr [, env]) ->
 *   process, stdin_stream, stdout_stream, stderr_stream */
static int l_spawn_process(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  uv_process_options_t opts;
  uv_stdio_container_t stdio[3];
  const char *modes[3];
  ts_process *p;
  int i, err, base;

  luaL_checktype(L, 1, LUA_TTABLE);
  for (i = 0; i < 3; i++)
    modes[i] = luaL_optstring(L, 2 + i, NULL);
  memset(&opts, 0, sizeof(opts));
  opts.args = string_array(L, 1, "argv");
  luaL_argcheck(L, opts.args[0] != NULL, 1, "empty argv");
  opts.file = opts.args[0];
  if (lua_istable(L, 5))
    opts.env = string_array(L, 5, "env");
  p = lua_newuserdatauv(L, sizeof(*p), 0);
  memset(p, 0, sizeof(*p));
  p->loop = loop;
  ts_waiter_init(&p->exit_waiter);
  luaL_setmetatable(L, TS_PROCESS_MT);
  base = lua_gettop(L);
  for (i = 0; i < 3; i++)
    setup_stdio(L, &stdio[i], i, modes[i], i == 0);
  opts.stdio = stdio;
  opts.stdio_count = 3;
  opts.exit_cb = exit_cb;
  p->h.data = p;
  lua_pushvalue(L, base);
  p->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  err = uv_spawn(loop->uv, &p->h, &opts);
  if (err != 0) {
    /* The handle is initialized even when the spawn fails. */
    p->closed = p->exited = 1;
    uv_close((uv_handle_t *)&p->h, process_closed);
    for (i = 1; i <= 3; i++)
      close_stream_at(L, base + i);
    return luaL_error(L, "Subprocess: cannot run %s: %s", opts.file, uv_strerror(err));
  }
  for (i = 2; i <= 3; i++) /* the child's stdout and stderr */
    if (!lua_isnil(L, base + i))
      ts__stream_start(ts__check_stream(L, base + i));
  return 4;
}

static ts_process *check_process(lua_State *L) {
  return luaL_checkudata(L, 1, TS_PROCESS_MT);
}

static int proc_pid(lua_State *L) {
  lua_pushinteger(L, check_process(L)->h.pid);
  return 1;
}

static int proc_kill(lua_State *L) {
  ts_process *p = check_process(L);
  int sig = (int)luaL_optinteger(L, 2, SIGTERM);
  int err = p->closed ? UV_ESRCH : uv_process_kill(&p->h, sig);
  lua_pushboolean(L, err == 0);
  return 1;
}

/* wait_for_exit() -> exit status, terminating signal (0 if none) */
static int proc_wait(lua_State *L) {
  ts_process *p = check_process(L);

  if (p->exited) {
    lua_pushinteger(L, p->status);
    lua_pushinteger(L, p->term_signal);
    return 2;
  }
  if (ts_waiter_waiting(&p->exit_waiter))
    return luaL_error(L, "wait_for_exit: already waiting");
  ts__check_task(L, "wait_for_exit");
  return ts_waiter_park(&p->exit_waiter, L);
}

int ts__open_subprocess(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"pid", proc_pid}, {"kill", proc_kill}, {"wait_for_exit", proc_wait}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"spawn_process", l_spawn_process}, {NULL, NULL}};

  luaL_newmetatable(L, TS_PROCESS_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
