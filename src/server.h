/* Listeners and the accept pipeline (server.c). */
#ifndef TS_SERVER_H
#define TS_SERVER_H

#include "stream.h"

int ts__open_server(lua_State *L);

#endif
