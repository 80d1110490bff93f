/* Timers and signal handlers handed to Lua (timer.c): core.timer and
 * core.signal. */
#ifndef TS_TIMER_H
#define TS_TIMER_H

#include "loop.h"

int ts__open_timer(lua_State *L);

#endif
