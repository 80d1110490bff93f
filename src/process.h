/* Subprocess and the prefork supervisor (process.c). */
#ifndef TS_PROCESS_H
#define TS_PROCESS_H

#include "stream.h"

int ts__open_process(lua_State *L);

#endif
