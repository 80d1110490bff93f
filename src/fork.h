/* Prefork (fork.c): fork_processes and its supervisor, task_id, cpu_count. */
#ifndef TS_FORK_H
#define TS_FORK_H

#include "loop.h"

int ts__open_fork(lua_State *L);

#endif
