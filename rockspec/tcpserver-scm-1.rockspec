rockspec_format = "3.0"
package = "tcpserver"
version = "scm-1"
source = {
  url = "git+file:///dev/null", -- built from a checkout with `luarocks make`
}
description = {
  summary = "Tornado's TCPServer model for Lua 5.4 on a libuv core",
  detailed = [[
Subclass TCPServer and write handle_stream(stream, address); each connection
runs it as a coroutine that reads and writes as if blocking, while one libuv
loop per process serves thousands of them.]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  LIBUV = {header = "uv.h", library = "uv"},
  OPENSSL = {header = "openssl/ssl.h", library = "ssl"},
}
build = {
  type = "builtin",
  modules = {
    ["tcpserver.core"] = {
      sources = {
        "src/addr.c", "src/buf.c", "src/client.c", "src/loop.c", "src/timer.c", "src/module.c",
        "src/netutil.c", "src/fork.c", "src/subprocess.c", "src/server.c",
        "src/stream.c", "src/stream_read.c", "src/stream_write.c", "src/stream_lua.c",
        "src/tls.c", "src/tls_ctx.c", "src/proxy.c",
      },
      defines = {"_POSIX_C_SOURCE=200809L"},
      incdirs = {"include", "src", "$(LIBUV_INCDIR)", "$(OPENSSL_INCDIR)"},
      libdirs = {"$(LIBUV_LIBDIR)", "$(OPENSSL_LIBDIR)"},
      libraries = {"uv", "ssl", "crypto"},
    },
    ["tcpserver"] = "lua/tcpserver/init.lua",
    ["tcpserver.broadcast"] = "lua/tcpserver/broadcast.lua",
    ["tcpserver.host"] = "lua/tcpserver/host.lua",
    ["tcpserver.ioloop"] = "lua/tcpserver/ioloop.lua",
    ["tcpserver.iostream"] = "lua/tcpserver/iostream.lua",
    ["tcpserver.locks"] = "lua/tcpserver/locks.lua",
    ["tcpserver.log"] = "lua/tcpserver/log.lua",
    ["tcpserver.metrics"] = "lua/tcpserver/metrics.lua",
    ["tcpserver.netutil"] = "lua/tcpserver/netutil.lua",
    ["tcpserver.flags"] = "lua/tcpserver/flags.lua",
    ["tcpserver.pool"] = "lua/tcpserver/pool.lua",
    ["tcpserver.process"] = "lua/tcpserver/process.lua",
    ["tcpserver.queues"] = "lua/tcpserver/queues.lua",
    ["tcpserver.socket"] = "lua/tcpserver/socket.lua",
    ["tcpserver.ssl"] = "lua/tcpserver/ssl.lua",
    ["tcpserver.tcpclient"] = "lua/tcpserver/tcpclient.lua",
    ["tcpserver.testing"] = "lua/tcpserver/testing.lua",
    ["tcpserver.waiters"] = "lua/tcpserver/waiters.lua",
  },
  install = {
    bin = {luahost = "src/host/luahost.lua"},
  },
}
