# tcpserver: the one entry point. `make run` and `make test` work on a fresh
# Debian 12 machine: they install what is missing (as root) first.

LUA        ?= lua5.4
PREFIX     ?= /usr/local
BUILD      ?= build
CC         ?= cc
CFLAGS     ?= -O2 -g
WARN        = -std=c11 -Wall -Wextra -Werror
PKGS        = lua5.4 libuv openssl
CPPFLAGS   += -D_POSIX_C_SOURCE=200809L -Iinclude -Isrc \
              $(shell pkg-config --cflags $(PKGS) 2>/dev/null || echo -I/usr/include/lua5.4)
LIBS        = $(shell pkg-config --libs libuv openssl 2>/dev/null || echo -luv -lssl -lcrypto)
LUA_LIBS    = $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)
LUA_SHARE   = $(PREFIX)/share/lua/5.4
LUA_LIB     = $(PREFIX)/lib/lua/5.4
BUSTED      = busted --lua=$(LUA)

# Debian packages: to build, to test, and the real peers the specs use.
DEB_PKGS = gcc make pkg-config lua5.4 liblua5.4-dev libuv1-dev libssl-dev \
           luarocks lua-busted lua-check openssl python3 netcat-openbsd haproxy \
           curl wrk redis-tools python3-websockets

CORE_SRC = $(filter-out src/host/%,$(wildcard src/*.c))
CORE_OBJ = $(CORE_SRC:src/%.c=$(BUILD)/obj/%.o)
CORE_SO  = $(BUILD)/tcpserver/core.so
HOST     = $(BUILD)/luahost
PORT    ?= 8888

.PHONY: all deps run test lint bench install uninstall clean

all: $(CORE_SO) $(HOST)

$(BUILD)/obj/%.o: src/%.c src/internal.h src/stream.h src/buf.h include/tcpserver.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC $(CPPFLAGS) -c $< -o $@

$(CORE_SO): $(CORE_OBJ)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(CORE_OBJ) $(LIBS)

$(HOST): src/host/main.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -o $@ $< $(LDFLAGS) $(LUA_LIBS) -Wl,-E -lm -ldl

# Installs the Debian packages that are missing: with apt-get as root,
# otherwise prints the command to run.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing Debian packages; run:"; \
	    echo "  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

run: deps
	$(MAKE) all
	$(HOST) examples/echo.lua --port $(PORT)

test: deps
	$(MAKE) all
	$(BUSTED) spec

lint:
	luacheck lua spec examples bench src/host/luahost.lua

bench: deps
	$(MAKE) all
	bash bench/run

install: all
	install -d $(DESTDIR)$(LUA_SHARE)/tcpserver $(DESTDIR)$(LUA_LIB)/tcpserver \
	  $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/include
	install -m 644 lua/tcpserver/*.lua $(DESTDIR)$(LUA_SHARE)/tcpserver/
	install -m 755 $(CORE_SO) $(DESTDIR)$(LUA_LIB)/tcpserver/core.so
	install -m 755 $(HOST) $(DESTDIR)$(PREFIX)/bin/luahost
	install -m 644 include/tcpserver.h $(DESTDIR)$(PREFIX)/include/

uninstall:
	rm -rf $(DESTDIR)$(LUA_SHARE)/tcpserver $(DESTDIR)$(LUA_LIB)/tcpserver
	rm -f $(DESTDIR)$(PREFIX)/bin/luahost $(DESTDIR)$(PREFIX)/include/tcpserver.h

clean:
	rm -rf $(BUILD)
