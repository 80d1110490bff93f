# tcpserver: the one entry point. `make run` and `make test` work on a fresh
# Debian 12 machine: they install what is missing (as root) first.

LUA        ?= lua5.4
PREFIX     ?= /usr/local
BUILD      ?= build
CC         ?= cc
CFLAGS     ?= -O2 -g
WARN        = -std=c11 -pedantic -Wall -Wextra -Werror
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
           curl python3-prometheus-client lua-logging lua-ldoc lua-discount clang-format cppcheck groff-base \
           wrk redis-tools python3-websockets redis-server lua-redis lua-socket

VERSION  = $(shell sed -n 's/^\#define TS_VERSION "\(.*\)"/\1/p' include/tcpserver.h)
MANDIR  ?= $(PREFIX)/share/man

CORE_SRC = $(filter-out src/host/%,$(wildcard src/*.c))
CORE_OBJ = $(CORE_SRC:src/%.c=$(BUILD)/obj/%.o)
CORE_SO  = $(BUILD)/tcpserver/core.so
CORE_LIB = $(BUILD)/libtcpserver.a
HOST     = $(BUILD)/luahost
PORT    ?= 8888

.PHONY: all deps run test lint docs rock bench bench-quick install uninstall clean \
        sanitize valgrind fuzz soak

all: $(CORE_SO) $(CORE_LIB) $(HOST)

$(BUILD)/obj/%.o: src/%.c $(wildcard src/*.h) include/tcpserver.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC $(CPPFLAGS) -c $< -o $@

$(CORE_SO): $(CORE_OBJ)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(CORE_OBJ) $(LIBS)

# For C hosts that embed the core (include/tcpserver.h, spec/embed_spec.lua).
$(CORE_LIB): $(CORE_OBJ)
	@rm -f $@
	$(AR) rcs $@ $(CORE_OBJ)

$(HOST): src/host/main.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) $(CPPFLAGS) -o $@ $< $(LDFLAGS) $(LUA_LIBS) -Wl,-E -lm -ldl

# Installs the Debian packages that are missing: with apt-get as root,
# otherwise prints the command to run. Without dpkg (not Debian) it only
# checks that the tools the build and the suite need are on PATH.
DEPS_TOOLS = $(CC) pkg-config $(LUA) busted
deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  for t in $(DEPS_TOOLS); do \
	    command -v $$t >/dev/null 2>&1 || { echo "deps: $$t not found; install it (make installs packages on Debian only)"; exit 1; }; \
	  done; exit 0; \
	fi; \
	missing=""; for p in $(DEB_PKGS); do \
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

# run and test build quietly: a compiler line is no news, its errors are.
run: deps
	@$(MAKE) -s --no-print-directory all
	@$(HOST) examples/echo.lua --port $(PORT)

test: deps
	@$(MAKE) -s --no-print-directory all
	$(BUSTED) spec

# C files kept in .clang-format's style (`clang-format -i` them after an edit).
FORMATTED_C = $(wildcard src/*.c src/*.h src/host/*.c include/*.h fuzz/*.c spec/embed/*.c)

lint:
	luacheck -q lua spec examples bench tools src/host/luahost.lua
	@for f in $(FORMATTED_C); do \
	  clang-format --dry-run --Werror $$f || exit 1; \
	done; echo "clang-format: $(words $(FORMATTED_C)) files in style"
	cppcheck -q --enable=warning,portability,performance --std=c11 --error-exitcode=1 \
	  -D_POSIX_C_SOURCE=200809L -Iinclude -Isrc src
	luarocks --lua-version 5.4 lint rockspec/tcpserver-scm-1.rockspec

# The API reference: LDoc over the Lua modules and docs/ldoc/IOStream.lua,
# which documents the methods the C core gives every stream.
DOCS_DIR ?= docs/api
docs:
	@mkdir -p $(BUILD)
	@ldoc -q --fatalwarnings -d $(DOCS_DIR) . >$(BUILD)/ldoc.log 2>&1 || { cat $(BUILD)/ldoc.log; exit 1; }
	@echo "API reference: $(DOCS_DIR)/index.html"

# A source rock of this checkout that installs without a network:
# `luarocks --lua-version 5.4 install ./tcpserver-$(VERSION)-1.src.rock`.
ROCK_DIR = $(BUILD)/rock
rock:
	@rm -rf $(ROCK_DIR) && mkdir -p $(ROCK_DIR)/tcpserver-$(VERSION)
	@cp -r src lua include rockspec README.md docs/luahost.1 $(ROCK_DIR)/tcpserver-$(VERSION)/
	@tar -C $(ROCK_DIR) -czf $(ROCK_DIR)/tcpserver-$(VERSION).tar.gz tcpserver-$(VERSION)
	@sed -e 's/^version = .*/version = "$(VERSION)-1"/' \
	  -e 's|^  url = .*|  url = "file://$(abspath $(ROCK_DIR))/tcpserver-$(VERSION).tar.gz",\n  dir = "tcpserver-$(VERSION)",|' \
	  rockspec/tcpserver-scm-1.rockspec > $(ROCK_DIR)/tcpserver-$(VERSION)-1.rockspec
	@cd $(ROCK_DIR) && luarocks --lua-version 5.4 pack tcpserver-$(VERSION)-1.rockspec >/dev/null
	@mv $(ROCK_DIR)/tcpserver-$(VERSION)-1.src.rock .
	@echo "tcpserver-$(VERSION)-1.src.rock"

bench: deps
	$(MAKE) all
	bash bench/run

# The headline targets only (echo d1/d16, bulk, kv -P 16, TLS handshakes,
# idle memory, HTTP, per-call CPU), in under 3 minutes: a check before a commit.
bench-quick: deps
	$(MAKE) all
	BENCH_QUICK=1 bash bench/run

install: all
	install -d $(DESTDIR)$(LUA_SHARE)/tcpserver $(DESTDIR)$(LUA_LIB)/tcpserver \
	  $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/include
	install -m 644 lua/tcpserver/*.lua $(DESTDIR)$(LUA_SHARE)/tcpserver/
	install -m 755 $(CORE_SO) $(DESTDIR)$(LUA_LIB)/tcpserver/core.so
	install -m 755 $(HOST) $(DESTDIR)$(PREFIX)/bin/luahost
	install -m 644 include/tcpserver.h $(DESTDIR)$(PREFIX)/include/
	install -d $(DESTDIR)$(PREFIX)/lib
	install -m 644 $(CORE_LIB) $(DESTDIR)$(PREFIX)/lib/libtcpserver.a
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 644 docs/luahost.1 $(DESTDIR)$(MANDIR)/man1/luahost.1
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; \
	  *) echo "note: $(PREFIX)/bin is not on your PATH; add it to run luahost:"; \
	     echo "  export PATH=\"$(PREFIX)/bin:\$$PATH\"";; esac

uninstall:
	rm -rf $(DESTDIR)$(LUA_SHARE)/tcpserver $(DESTDIR)$(LUA_LIB)/tcpserver
	rm -f $(DESTDIR)$(PREFIX)/bin/luahost $(DESTDIR)$(PREFIX)/include/tcpserver.h \
	  $(DESTDIR)$(MANDIR)/man1/luahost.1

# ---- disciplines: sanitizers, valgrind, fuzzing, soak ----

# sanitize: the core and luahost built with ASan and UBSan into a tree of
# their own (a sibling of lua/, where luahost looks for it), and the whole
# suite run with the runtime preloaded into lua5.4, which is not built with
# it. core.so is preloaded too, so that it is still mapped when
# LeakSanitizer runs at exit and its frames are named. Every process a spec
# starts inherits the preload, so reports go to files (exit status kept)
# and tools/sanitizer-logs.sh fails on those with a frame of ours. Peers
# that break under the preload run without it, through wrappers first in
# PATH: curl hangs (in its resolver), groff's troff aborts (new[]/free).
SAN_BUILD = build-sanitize
SAN_FLAGS = -fsanitize=address,undefined,float-cast-overflow
SAN_LOGS  = $(CURDIR)/$(SAN_BUILD)/logs
SAN_PEERS = curl groff
SAN_ENV   = TS_BUILD=$(SAN_BUILD) TS_EMBED_LDFLAGS="$(SAN_FLAGS)" \
  PATH=$(CURDIR)/$(SAN_BUILD)/peers:$$PATH \
  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $(CURDIR)/$(SAN_BUILD)/tcpserver/core.so" \
  ASAN_OPTIONS=log_path=$(SAN_LOGS)/asan:exitcode=0:detect_leaks=1 \
  LSAN_OPTIONS=suppressions=$(CURDIR)/tools/lsan.supp:print_suppressions=0 \
  UBSAN_OPTIONS=log_path=$(SAN_LOGS)/ubsan:print_stacktrace=1

sanitize: deps
	@$(MAKE) -s --no-print-directory BUILD=$(SAN_BUILD) CC=gcc LDFLAGS="$(SAN_FLAGS)" \
	  CFLAGS="-O1 -g -fno-omit-frame-pointer $(SAN_FLAGS) -fno-sanitize-recover=all" all
	@rm -rf $(SAN_LOGS) $(SAN_BUILD)/peers && mkdir -p $(SAN_LOGS) $(SAN_BUILD)/peers
	@for p in $(SAN_PEERS); do \
	  printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$$@"\n' "$$(command -v $$p)" >$(SAN_BUILD)/peers/$$p; \
	  chmod +x $(SAN_BUILD)/peers/$$p; \
	done
	@$(SAN_ENV) $(BUSTED) spec; status=$$?; \
	  sh tools/sanitizer-logs.sh $(SAN_LOGS) && exit $$status

# valgrind: memcheck over specs that reach every C file (see the script).
valgrind:
	@$(MAKE) -s --no-print-directory deps DEB_PKGS="$(DEB_PKGS) valgrind"
	@$(MAKE) -s --no-print-directory all
	@bash tools/valgrind.sh $(CURDIR)/$(CORE_SO)

# fuzz: libFuzzer targets (clang) in fuzz/, each run FUZZ_SECONDS from its
# seeds in fuzz/corpus/<target>/; what they find new stays in build-fuzz.
FUZZ_SECONDS ?= 30
FUZZ_BUILD    = build-fuzz
FUZZ_TARGETS  = buf_find proxy_parse tls_read
FUZZ_PKGS     = clang libclang-rt-14-dev
FUZZ_FLAGS    = -fsanitize=address,undefined -fno-sanitize-recover=all

fuzz:
	@$(MAKE) -s --no-print-directory deps DEB_PKGS="$(DEB_PKGS) $(FUZZ_PKGS)"
	@$(MAKE) -s --no-print-directory BUILD=$(FUZZ_BUILD) CC=clang \
	  CFLAGS="-O1 -g $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link" \
	  $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz/%)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	  $(FUZZ_BUILD)/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_BUILD)/$$t- $(FUZZ_BUILD)/corpus/$$t fuzz/corpus/$$t \
	    >$(FUZZ_BUILD)/$$t.log 2>&1 || { tail -40 $(FUZZ_BUILD)/$$t.log; exit 1; }; \
	  echo "fuzz $$t: $$(grep -o 'stat::number_of_executed_units: *[0-9]*' $(FUZZ_BUILD)/$$t.log | grep -o '[0-9]*$$') runs in $(FUZZ_SECONDS) s, no crash"; \
	done

$(BUILD)/fuzz/%: fuzz/%.c $(CORE_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fsanitize=fuzzer $(CPPFLAGS) -o $@ $< $(CORE_OBJ) \
	  $(LIBS) $(LUA_LIBS) -lm

# soak: 100,000 connect/echo/close cycles (plain, TLS, PROXY) and waves of
# 10,000 idle connections against one server; fails on RSS growth after the
# warm-up over 10% or descriptors not back to their baseline.
soak: deps all
	@$(HOST) tools/soak.lua

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(FUZZ_BUILD)
