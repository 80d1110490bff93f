/* A C host that runs its own libuv loop and embeds the core: it hands the
 * loop over with ts_set_loop, runs the Lua script given as argv[1] (which
 * listens and returns), then drives the loop itself until nothing is left,
 * closes the Lua state and checks that the core left no handle behind. */
#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <uv.h>

#include "tcpserver.h"

int main(int argc, char **argv) {
  uv_loop_t loop;
  lua_State *L;

  if (argc < 2 || uv_loop_init(&loop) != 0)
    return 2;
  L = luaL_newstate();
  luaL_openlibs(L);
  if (ts_set_loop(L, &loop) != 0)
    return 3;
  luaL_requiref(L, "tcpserver.core", luaopen_tcpserver_core, 0);
  lua_pop(L, 1);
  if (luaL_dofile(L, argv[1]) != LUA_OK) {
    fprintf(stderr, "host: %s\n", lua_tostring(L, -1));
    return 1;
  }
  if (ts_get_loop(L) != &loop || ts_set_loop(L, &loop) != -1)
    return 4;
  uv_run(&loop, UV_RUN_DEFAULT); /* the host drives the loop */
  lua_close(L);
  uv_run(&loop, UV_RUN_DEFAULT); /* the close callbacks of the core's handles */
  if (uv_loop_close(&loop) != 0) {
    fprintf(stderr, "host: the core left handles open\n");
    return 5;
  }
  puts("host: clean exit");
  return 0;
}
