/* TLS (tls.c): OpenSSL contexts, and the TLS layer of a stream. */
#ifndef TS_TLS_H
#define TS_TLS_H

#include "stream.h"

/* Puts TLS under stream s with the context at ctx_idx; a client starts its
 * handshake at once. `host`: a client's name to verify, a server's peer
 * for logs. Returns 0 or UV_ENOMEM. */
int ts__tls_attach(lua_State *L, ts_stream *s, int ctx_idx, int server, const char *host,
                   double timeout);
/* Bytes that arrived before the layer was attached (after a PROXY header). */
void ts__tls_feed(ts_stream *s, const char *data, size_t n);
int ts__open_tls(lua_State *L);

#endif
