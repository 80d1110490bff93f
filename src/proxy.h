/* PROXY protocol v1/v2 (HAProxy's): the header a load balancer sends before
 * the client's bytes. A pure parser: no libuv, no Lua, no allocation, so
 * that it can be fuzzed on its own (fuzz/proxy_parse.c). */
#ifndef TS_PROXY_H
#define TS_PROXY_H

#include <stddef.h>

/* The longest header accepted: a v2 header with a 1024-byte body (a v1
 * line is at most 107 bytes). Longer ones are refused as too large. */
#define TS_PROXY_MAX_HEADER (16 + 1024)

typedef struct ts_proxy_addr {
  char host[46]; /* INET6_ADDRSTRLEN */
  int port;
  int family; /* 0 = keep the connection's own address (LOCAL / UNKNOWN),
                 AF_INET, AF_INET6 */
} ts_proxy_addr;

/* Parses the header at the start of p[0, n). Returns > 0 when it is
 * complete (that many bytes are the header, *out holds the client), 0 when
 * more bytes are needed, -1 when it is malformed (*why says why). Never
 * reads past n; feeding a longer prefix never turns -1 or > 0 into
 * something else. */
long ts_proxy_parse(const char *p, size_t n, ts_proxy_addr *out, const char **why);

#endif
