/* Outgoing connections (client.c). */
#ifndef TS_CLIENT_H
#define TS_CLIENT_H

#include "stream.h"

int ts__open_client(lua_State *L);

#endif
