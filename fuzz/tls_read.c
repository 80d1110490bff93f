/* libFuzzer target: the TLS read path of an accepted stream, driven
 * through the core's own code. Each input becomes the ciphertext a client
 * sends: a server-side stream (on one end of a socketpair) gets the TLS
 * layer with ts__tls_attach, as server.c attaches it, and the bytes go to
 * the layer's on_read through ts__tls_feed, as stream.c's read callback
 * hands them over (chunked as the first byte says: 0 = all at once, else
 * that many at a time). The stream is then aborted and collected, so
 * leaks show too. */
#include "tls.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <lualib.h>

static lua_State *L;
static int ctx_ref;

/* A self-signed certificate for the server side, made once. */
static void make_certificate(char *cert, char *key, size_t len) {
  char dir[] = "/tmp/tls_read_fuzz.XXXXXX", cmd[512];

  if (mkdtemp(dir) == NULL)
    abort();
  snprintf(cert, len, "%s/cert.pem", dir);
  snprintf(key, len, "%s/key.pem", dir);
  snprintf(cmd, sizeof(cmd),
           "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
           "-keyout %s -out %s -days 2 -subj /CN=localhost 2>/dev/null",
           key, cert);
  if (system(cmd) != 0)
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  char cert[256], key[256];

  (void)argc;
  (void)argv;
  make_certificate(cert, key, sizeof(cert));
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "tcpserver.core", luaopen_tcpserver_core, 0);
  lua_getfield(L, -1, "set_log_handler"); /* TLS failures log: keep quiet */
  if (luaL_loadstring(L, "return function() end") != LUA_OK)
    abort();
  lua_call(L, 0, 1);
  lua_call(L, 1, 0);
  lua_getfield(L, -1, "ssl_context");
  lua_createtable(L, 0, 2);
  lua_pushstring(L, cert);
  lua_setfield(L, -2, "certfile");
  lua_pushstring(L, key);
  lua_setfield(L, -2, "keyfile");
  lua_call(L, 1, 1);
  ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  return 0;
}

/* Runs the loop until the aborted stream's handles are closed (nothing
 * else is active here), within bounds. */
static void settle(void) {
  int i;

  for (i = 0; i < 100 && uv_run(ts__loop(L)->uv, UV_RUN_NOWAIT) != 0; i++)
    ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  size_t step, i, n;
  ts_stream *s;
  int sv[2];

  if (size < 1)
    return 0;
  step = data[0] ? data[0] : size;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
    abort();
  s = ts__stream_new(L, 0);
  lua_pop(L, 1); /* pinned until its close callback */
  if (uv_tcp_open((uv_tcp_t *)ts__stream_handle(s), sv[0]) != 0)
    abort();
  ts__stream_configure(s, 1 << 20, 64 * 1024, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
  if (ts__tls_attach(L, s, lua_gettop(L), 1, "fuzz", 0) != 0)
    abort();
  lua_pop(L, 1);
  for (i = 1; i < size && !ts__stream_closed(s); i += n) {
    n = size - i < step ? size - i : step;
    ts__tls_feed(s, (const char *)data + i, n);
  }
  ts__stream_abort(s);
  settle();
  close(sv[1]);
  lua_gc(L, LUA_GCCOLLECT); /* frees the stream, and its SSL, in __gc */
  return 0;
}
