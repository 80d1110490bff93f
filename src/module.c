/* luaopen_tcpserver_core: one table holding every part of the core. */
#include "internal.h"

int luaopen_tcpserver_core(lua_State *L) {
  lua_newtable(L);
  ts__open_loop(L);
  ts__open_stream(L);
  ts__open_tls(L);
  ts__open_server(L);
  ts__open_netutil(L);
  ts__open_client(L);
  ts__open_process(L);
  lua_pushliteral(L, TS_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
