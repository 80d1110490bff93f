/* Addresses and libuv error names (addr.c): what Lua sees of a sockaddr
 * and of an error code. */
#ifndef TS_ADDR_H
#define TS_ADDR_H

#include <lua.h>
#include <stddef.h>
#include <uv.h>

/* Writes the IP of sa into host (empty for other families); returns its
 * port. */
int ts__addr_name(const struct sockaddr *sa, char *host, size_t len);
/* Pushes host, port, family ("inet", "inet6" or "unix"); returns 3. */
int ts__push_addr(lua_State *L, const struct sockaddr *sa);
const char *ts__addr_family(int family);
/* The short error a read or write reports: "closed", "timeout", ... */
const char *ts__errname(int uverr);
/* Resets, aborts, broken pipes and timeouts end a connection quietly. */
int ts__quiet_error(int uverr);

#endif
