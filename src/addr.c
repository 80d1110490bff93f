/* Addresses and libuv error names. */
#include "addr.h"

int ts__quiet_error(int err) {
  return err == 0 || err == UV_ECONNRESET || err == UV_EPIPE || err == UV_ECONNABORTED ||
         err == UV_ETIMEDOUT || err == UV_EOF;
}

const char *ts__errname(int err) {
  switch (err) {
  case UV_ECONNREFUSED: return "connection refused";
  case UV_ETIMEDOUT: return "timeout";
  case UV_ECANCELED: return "closed";
  case UV_E2BIG: return "too large";
  default: return ts__quiet_error(err) ? "closed" : uv_strerror(err);
  }
}

int ts__addr_name(const struct sockaddr *sa, char *host, size_t len) {
  if (sa->sa_family == AF_INET6) {
    uv_ip6_name((const struct sockaddr_in6 *)sa, host, len);
    return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
  }
  if (sa->sa_family == AF_INET) {
    uv_ip4_name((const struct sockaddr_in *)sa, host, len);
    return ntohs(((const struct sockaddr_in *)sa)->sin_port);
  }
  if (len > 0)
    host[0] = '\0';
  return 0;
}

const char *ts__addr_family(int family) {
  return family == AF_INET6 ? "inet6" : family == AF_INET ? "inet" : "unix";
}

int ts__push_addr(lua_State *L, const struct sockaddr *sa) {
  char host[INET6_ADDRSTRLEN];
  int port = ts__addr_name(sa, host, sizeof(host));

  lua_pushstring(L, host);
  lua_pushinteger(L, port);
  lua_pushstring(L, ts__addr_family(sa->sa_family));
  return 3;
}
