/* Listening sockets, bound before the loop exists so that a process may
 * bind, fork, then serve. */
#define _GNU_SOURCE
#include "netutil.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

typedef struct ts_socket {
  int fd;
  int family;
  int in_use; /* owned by a listener: close the server instead */
} ts_socket;

static ts_socket *check_socket(lua_State *L) {
  return luaL_checkudata(L, 1, TS_SOCKET_MT);
}

/* The user value holds the socket's name (systemd's LISTEN_FDNAMES). */
static ts_socket *push_socket(lua_State *L, int fd, int family) {
  ts_socket *s = lua_newuserdatauv(L, sizeof(*s), 1);
  s->fd = fd;
  s->family = family;
  s->in_use = 0;
  luaL_setmetatable(L, TS_SOCKET_MT);
  return s;
}

int ts__socket_take(lua_State *L, int idx, int *family) {
  ts_socket *s = luaL_checkudata(L, idx, TS_SOCKET_MT);
  if (s->fd < 0)
    luaL_argerror(L, idx, "socket is closed");
  if (s->in_use)
    luaL_argerror(L, idx, "socket is already served");
  s->in_use = 1;
  *family = s->family;
  return s->fd;
}

void ts__socket_release(lua_State *L, int idx) {
  ts_socket *s = luaL_checkudata(L, idx, TS_SOCKET_MT);
  s->in_use = 0;
  s->fd = -1;
}

static int fail_errno(lua_State *L, const char *what, const char *host, int port) {
  return luaL_error(L, "%s %s:%d: %s", what, host, port, strerror(errno));
}

/* Opens, configures and binds one listening socket; returns fd or -1. */
static int open_listener(const struct addrinfo *ai, int backlog, int reuse_port) {
  int one = 1, fd, saved;

  fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
    goto fail;
  if (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)))
    goto fail;
  /* Without V6ONLY the IPv6 socket would also claim the IPv4 port. */
  if (ai->ai_family == AF_INET6 &&
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0)
    goto fail;
  if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, backlog) != 0)
    goto fail;
  return fd;
fail:
  saved = errno;
  close(fd);
  errno = saved;
  return -1;
}

static void set_port(struct sockaddr *sa, int port) {
  if (sa->sa_family == AF_INET)
    ((struct sockaddr_in *)sa)->sin_port = htons((uint16_t)port);
  else
    ((struct sockaddr_in6 *)sa)->sin6_port = htons((uint16_t)port);
}

static int bound_port(int fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
    return 0;
  if (ss.ss_family == AF_INET)
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
  return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

/* core.bind_sockets(port, host|nil, family|nil, backlog, reuse_port) */
static int l_bind_sockets(lua_State *L) {
  int port = (int)luaL_checkinteger(L, 1);
  const char *host = luaL_optstring(L, 2, NULL);
  const char *fam = luaL_optstring(L, 3, NULL);
  int backlog = (int)luaL_checkinteger(L, 4); /* netutil.lua's default */
  int reuse_port = lua_toboolean(L, 5);
  struct addrinfo hints, *res = NULL, *ai;
  char service[16];
  int rc, n = 0, fd;

  luaL_argcheck(L, port >= 0 && port <= 65535, 1, "port out of range");
  memset(&hints, 0, sizeof(hints));
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  hints.ai_family = fam == NULL                 ? AF_UNSPEC
                    : strcmp(fam, "inet6") == 0 ? AF_INET6
                                                : AF_INET;
  if (host != NULL && host[0] == '\0')
    host = NULL;
  snprintf(service, sizeof(service), "%d", port);
  rc = getaddrinfo(host, service, &hints, &res);
  if (rc != 0)
    return luaL_error(L, "bind_sockets: cannot resolve %s: %s", host ? host : "*",
                      gai_strerror(rc));
  lua_newtable(L);
  for (ai = res; ai != NULL; ai = ai->ai_next) {
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
      continue;
    if (port == 0 && n > 0) /* every family on the port the first got */
      set_port(ai->ai_addr, bound_port(((ts_socket *)lua_touserdata(L, -1))->fd));
    fd = open_listener(ai, backlog, reuse_port);
    if (fd < 0) {
      if (errno == EADDRNOTAVAIL && ai->ai_family == AF_INET6)
        continue; /* no IPv6 on this host */
      freeaddrinfo(res);
      return fail_errno(L, "bind_sockets: cannot listen on", host ? host : "*", port);
    }
    if (n > 0)
      lua_pop(L, 1);
    push_socket(L, fd, ai->ai_family);
    lua_pushvalue(L, -1);
    lua_rawseti(L, -3, ++n);
  }
  freeaddrinfo(res);
  if (n > 0)
    lua_pop(L, 1);
  return 1;
}

/* core.bind_unix_socket(path, mode, backlog) */
static int l_bind_unix_socket(lua_State *L) {
  size_t plen;
  const char *path = luaL_checklstring(L, 1, &plen);
  int mode = (int)luaL_optinteger(L, 2, 0600);
  int backlog = (int)luaL_checkinteger(L, 3);
  struct sockaddr_un sun;
  struct stat st;
  /* "\0name": Linux's abstract namespace, no file, the length counts */
  int abstract = plen > 1 && path[0] == '\0', fd;
  socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);

  luaL_argcheck(
      L, plen > 0 && plen < sizeof(sun.sun_path) && (abstract || strlen(path) == plen), 1,
      "path empty, too long or with a NUL inside");
  if (!abstract && lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return luaL_error(L, "bind_unix_socket: %s exists and is not a socket", path);
    unlink(path); /* a stale socket from an earlier run */
  }
  memset(&sun, 0, sizeof(sun));
  sun.sun_family = AF_UNIX;
  memcpy(sun.sun_path, path, plen);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, (struct sockaddr *)&sun, abstract ? len : sizeof(sun)) != 0 ||
      (!abstract && chmod(path, (mode_t)mode) != 0) || listen(fd, backlog) != 0) {
    int saved = errno;
    if (fd >= 0)
      close(fd);
    return luaL_error(L, "bind_unix_socket: %s%s: %s", abstract ? "@" : "",
                      path + abstract, strerror(saved));
  }
  push_socket(L, fd, AF_UNIX);
  return 1;
}

/* ---- sockets passed by systemd (socket activation) ---- */

#define LISTEN_FDS_START 3

/* Parses a decimal integer that is the whole string; -1 if it is not. */
static long parse_count(const char *str) {
  char *end;
  long v;

  if (str == NULL || *str < '0' || *str > '9')
    return -1;
  errno = 0;
  v = strtol(str, &end, 10);
  return (errno != 0 || *end != '\0' || v > INT_MAX - LISTEN_FDS_START) ? -1 : v;
}

/* Checks that fd is a listening stream socket and gets it ready for the
 * accept loop: non-blocking, close-on-exec. Returns its family, or -1 and
 * why not in *why. */
static int adopt_listener(int fd, const char **why) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  int type = 0, listening = 0, flags;
  socklen_t ilen = sizeof(int);

  *why = "is not open";
  if (fcntl(fd, F_GETFD) < 0)
    return -1;
  *why = "is not a listening stream socket";
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ilen) != 0 || type != SOCK_STREAM)
    return -1;
  ilen = sizeof(int);
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) != 0 || !listening)
    return -1;
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
    return -1;
  if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6 && ss.ss_family != AF_UNIX)
    return -1;
  flags = fcntl(fd, F_GETFL);
  *why = "cannot be made non-blocking";
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 ||
      fcntl(fd, F_SETFD, FD_CLOEXEC) != 0)
    return -1;
  return ss.ss_family;
}

/* Pushes the i-th (0-based) name of a colon-separated list, or nil. */
static void push_fdname(lua_State *L, const char *names, int i) {
  const char *end;

  for (; names != NULL && i > 0; i--) {
    names = strchr(names, ':');
    if (names != NULL)
      names++;
  }
  if (names == NULL) {
    lua_pushnil(L);
    return;
  }
  end = strchr(names, ':');
  lua_pushlstring(L, names, end ? (size_t)(end - names) : strlen(names));
  if (lua_rawlen(L, -1) == 0) {
    lua_pop(L, 1);
    lua_pushnil(L);
  }
}

/* core.inherited_sockets() -> the listening sockets systemd passed (as
 * sd_listen_fds(1): LISTEN_PID must be ours; the variables are unset). */
static int l_inherited_sockets(lua_State *L) {
  const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
  const char *names = getenv("LISTEN_FDNAMES");
  const char *why;
  long n, owner;
  int i, family;

  /* Copies: unsetenv may free them. */
  lua_pushstring(L, fds);
  lua_pushstring(L, names);
  names = lua_tostring(L, -1);
  fds = lua_tostring(L, -2);
  owner = parse_count(pid);
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  lua_newtable(L);
  if (fds == NULL || pid == NULL)
    return 1; /* nothing passed */
  if (owner <= 0)
    return luaL_error(L, "inherited_sockets: bad LISTEN_PID");
  if (owner != (long)getpid())
    return 1; /* passed to another process, which exec'd us */
  n = parse_count(fds);
  if (n < 0)
    return luaL_error(L, "inherited_sockets: bad LISTEN_FDS '%s'", fds);
  for (i = 0; i < n; i++) {
    family = adopt_listener(LISTEN_FDS_START + i, &why);
    if (family < 0)
      return luaL_error(L, "inherited_sockets: fd %d %s", LISTEN_FDS_START + i, why);
    push_socket(L, LISTEN_FDS_START + i, family);
    push_fdname(L, names, i);
    lua_setiuservalue(L, -2, 1);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static int sock_getsockname(lua_State *L) {
  ts_socket *s = check_socket(L);
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);

  if (s->fd < 0 || getsockname(s->fd, (struct sockaddr *)&ss, &len) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, s->fd < 0 ? "closed" : strerror(errno));
    return 2;
  }
  if (ss.ss_family == AF_UNIX) {
    const char *path = ((struct sockaddr_un *)&ss)->sun_path;
    size_t n = len - offsetof(struct sockaddr_un, sun_path);
    if (n > 0 && path[0] != '\0') /* a file: NUL-terminated */
      n = strnlen(path, n);
    lua_pushlstring(L, path, n);
    lua_pushinteger(L, 0);
    lua_pushliteral(L, "unix");
    return 3;
  }
  return ts__push_addr(L, (struct sockaddr *)&ss);
}

static int sock_fileno(lua_State *L) {
  lua_pushinteger(L, check_socket(L)->fd);
  return 1;
}

static int sock_close(lua_State *L) {
  ts_socket *s = check_socket(L);
  if (s->in_use)
    return luaL_error(L, "socket is served by a server: stop the server instead");
  if (s->fd >= 0)
    close(s->fd);
  s->fd = -1;
  return 0;
}

static int sock_gc(lua_State *L) {
  ts_socket *s = check_socket(L);
  if (s->fd >= 0 && !s->in_use)
    close(s->fd);
  s->fd = -1;
  return 0;
}

static int sock_tostring(lua_State *L) {
  ts_socket *s = check_socket(L);
  if (lua_getiuservalue(L, 1, 1) == LUA_TSTRING)
    lua_pushfstring(L, "tcpserver.socket %s (fd %d)", lua_tostring(L, -1), s->fd);
  else
    lua_pushfstring(L, "tcpserver.socket (fd %d)", s->fd);
  return 1;
}

/* Methods, and the `name` field (nil unless systemd named the socket). */
static int sock_index(lua_State *L) {
  check_socket(L);
  if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "name") == 0) {
    lua_getiuservalue(L, 1, 1);
    return 1;
  }
  lua_pushvalue(L, 2);
  lua_gettable(L, lua_upvalueindex(1));
  return 1;
}

int ts__open_netutil(lua_State *L) {
  static const luaL_Reg methods[] = {{"getsockname", sock_getsockname},
                                     {"fileno", sock_fileno},
                                     {"close", sock_close},
                                     {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", sock_gc},
                                  {"__close", sock_gc},
                                  {"__tostring", sock_tostring},
                                  {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"bind_sockets", l_bind_sockets},
                                   {"bind_unix_socket", l_bind_unix_socket},
                                   {"inherited_sockets", l_inherited_sockets},
                                   {NULL, NULL}};

  luaL_newmetatable(L, TS_SOCKET_MT);
  luaL_setfuncs(L, meta, 0);
  luaL_newlib(L, methods);
  lua_pushcclosure(L, sock_index, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
