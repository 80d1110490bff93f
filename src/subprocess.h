/* Subprocess (subprocess.c): a child process with streams on its pipes. */
#ifndef TS_SUBPROCESS_H
#define TS_SUBPROCESS_H

#include "stream.h"

int ts__open_subprocess(lua_State *L);

#endif
