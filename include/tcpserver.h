/* tcpserver: Tornado's TCPServer model for Lua 5.4 on a libuv core.
 *
 * The public C API is the Lua module entry point; everything else is
 * reached through Lua (require "tcpserver.core"). */
#ifndef TCPSERVER_H
#define TCPSERVER_H

#define TS_VERSION "0.1.0"

struct lua_State;

/* Opens the core module and leaves its table on the stack. */
int luaopen_tcpserver_core(struct lua_State *L);

#endif
