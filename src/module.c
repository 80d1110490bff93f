/* luaopen_tcpserver_core: one table holding every part of the core. */
#include "client.h"
#include "netutil.h"
#include "fork.h"
#include "server.h"
#include "subprocess.h"
#include "timer.h"
#include "tls.h"

int luaopen_tcpserver_core(lua_State *L) {
  lua_State *main_thread;

  /* Lua leaves the main thread's extra space uninitialized and copies it
   * into every new thread; tasks are told apart by it (loop.c), so it must
   * start NULL before any thread is created after this. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
  main_thread = lua_tothread(L, -1);
  lua_pop(L, 1);
  *(void **)lua_getextraspace(main_thread) = NULL;
  lua_newtable(L);
  ts__open_loop(L);
  ts__open_timer(L);
  ts__open_stream(L); /* before tls: it adds stream methods (ts__stream_methods) */
  ts__open_tls(L);
  ts__open_server(L);
  ts__open_netutil(L);
  ts__open_client(L);
  ts__open_subprocess(L);
  ts__open_fork(L);
  lua_pushliteral(L, TS_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
