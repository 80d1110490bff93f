/* tcpserver: Tornado's TCPServer model for Lua 5.4 on a libuv core.
 *
 * Embedding: a C host opens the core in its lua_State like any C module
 * (luaL_requiref(L, "tcpserver.core", luaopen_tcpserver_core, 0), or lets
 * `require` find core.so). By default the core runs libuv's default loop
 * itself, inside ioloop.start(). A host that already runs a uv_loop_t hands
 * it over first with ts_set_loop, as luv_set_loop does; the core then adds
 * its handles to that loop and the host drives it (uv_run): servers, tasks
 * and timers work without ioloop.start(). Each lua_State has its own
 * context; states in different threads need different loops. Before
 * lua_close, stop the servers, close the streams and cancel the timers
 * and signal handlers the scripts made: libuv holds their handles, whose
 * memory the Lua state owns. */
#ifndef TCPSERVER_H
#define TCPSERVER_H

#define TS_VERSION "0.1.0"

struct lua_State;
struct uv_loop_s;

/* Opens the core module and leaves its table on the stack. */
int luaopen_tcpserver_core(struct lua_State *L);

/* Makes the core of state L use `loop`, which the caller runs and closes
 * (after closing L). Call it before anything uses the core in L: returns
 * 0, or -1 if the core already runs on a loop there. */
int ts_set_loop(struct lua_State *L, struct uv_loop_s *loop);

/* The loop the core of state L runs on. */
struct uv_loop_s *ts_get_loop(struct lua_State *L);

#endif
