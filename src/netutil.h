/* Binding sockets (netutil.c): bind_sockets, unix sockets, sockets passed
 * by systemd; the socket objects a listener takes. */
#ifndef TS_NETUTIL_H
#define TS_NETUTIL_H

#define TS_SOCKET_MT "tcpserver.socket"

#include "loop.h"

/* A listener takes a socket's fd (raises if it is closed or served)... */
int ts__socket_take(lua_State *L, int idx, int *family);
/* ...and gives it back closed. */
void ts__socket_release(lua_State *L, int idx);
int ts__open_netutil(lua_State *L);

#endif
