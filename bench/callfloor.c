/* callfloor.c -- the floor that bench/calls.lua compares stream calls with:
 * the least a C function called from Lua can do to hand back (or take) a
 * string of a given length.  A stream read must at least make a Lua string
 * of the line (an allocation and a copy) and be called as a method on a
 * userdata; these functions do exactly that and nothing else, so "2x the
 * floor" means the core spends no more on a call than Lua's own minimum.
 *
 *   local floor = require "callfloor"
 *   floor.str(64)          -- a 64-byte string, plain C call
 *   local u = floor.new()
 *   u:str(64)              -- the same, as a method on a userdata (as
 *                          -- stream:read_bytes(64) is called)
 *   u:sink(s)              -- takes a string and copies it into a buffer
 *                          -- (as stream:write(s) must at least do)
 */
#include <lauxlib.h>
#include <lua.h>
#include <string.h>

#define SRC_LEN 65536

/* What the strings are made of; the sink's ring too. */
static char src[SRC_LEN];

typedef struct {
  size_t at; /* where the next sink() copy goes in src */
} floor_ud;

/* Lengths are capped at SRC_LEN: the floor is meant for short strings. */
static size_t checklen(lua_State *L, int idx) {
  lua_Integer n = luaL_checkinteger(L, idx);
  luaL_argcheck(L, n >= 0 && n <= SRC_LEN, idx, "length out of range");
  return (size_t)n;
}

static int f_str(lua_State *L) {
  lua_pushlstring(L, src, checklen(L, 1));
  return 1;
}

/* The method form: lua_touserdata only, as cheap as a self check gets. */
static int m_str(lua_State *L) {
  luaL_checktype(L, 1, LUA_TUSERDATA);
  lua_pushlstring(L, src, checklen(L, 2));
  return 1;
}

static int m_sink(lua_State *L) {
  floor_ud *u = lua_touserdata(L, 1);
  size_t len;
  const char *p = luaL_checklstring(L, 2, &len);

  luaL_argcheck(L, u != NULL, 1, "callfloor object expected");
  if (len > SRC_LEN)
    len = SRC_LEN;
  if (u->at + len > SRC_LEN)
    u->at = 0;
  memcpy(src + u->at, p, len);
  u->at += len;
  lua_pushboolean(L, 1);
  return 1;
}

static int f_new(lua_State *L) {
  floor_ud *u = lua_newuserdatauv(L, sizeof(*u), 0);
  u->at = 0;
  luaL_setmetatable(L, "callfloor");
  return 1;
}

int luaopen_callfloor(lua_State *L) {
  static const luaL_Reg methods[] = {{"str", m_str}, {"sink", m_sink}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"str", f_str}, {"new", f_new}, {NULL, NULL}};

  memset(src, 'x', sizeof(src));
  luaL_newmetatable(L, "callfloor");
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
