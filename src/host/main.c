/* luahost: runs a Lua script with tcpserver on its paths, then the loop.
 * The policy lives in Lua (tcpserver.host); this file finds the modules
 * relative to the executable, in the build tree or an install prefix. */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Prepends `extra` to package[field]. */
static void prepend_path(lua_State *L, const char *field, const char *extra) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, field);
  lua_pushfstring(L, "%s;%s", extra, lua_tostring(L, -1));
  lua_setfield(L, -3, field);
  lua_pop(L, 2);
}

static void set_paths(lua_State *L) {
  char exe[PATH_MAX], path[PATH_MAX * 4 + 256];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  char *slash;

  if (n <= 0)
    return;
  exe[n] = '\0';
  slash = strrchr(exe, '/');
  if (slash == NULL)
    return;
  *slash = '\0';
  /* build/luahost next to build/tcpserver/core.so and ../lua; or an
   * install with bin/, share/lua/5.4 and lib/lua/5.4. */
  snprintf(path, sizeof(path),
           "%s/../lua/?.lua;%s/../lua/?/init.lua;"
           "%s/../share/lua/5.4/?.lua;%s/../share/lua/5.4/?/init.lua",
           exe, exe, exe, exe);
  prepend_path(L, "path", path);
  snprintf(path, sizeof(path), "%s/?.so;%s/../lib/lua/5.4/?.so", exe, exe);
  prepend_path(L, "cpath", path);
}

static int run(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  int i;

  luaL_openlibs(L);
  set_paths(L);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "tcpserver.host");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "main");
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_call(L, 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int status, code;

  if (L == NULL) {
    fprintf(stderr, "luahost: cannot create a Lua state\n");
    return 1;
  }
  lua_pushcfunction(L, run);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 0);
  if (status != LUA_OK) {
    fprintf(stderr, "luahost: %s\n", lua_tostring(L, -1));
    return 1;
  }
  code = (int)lua_tointeger(L, -1);
  fflush(stdout);
  /* No lua_close: handles may still be open, and exit is what they need. */
  _exit(code);
}
