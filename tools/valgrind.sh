#!/bin/bash
# make valgrind: memcheck over specs that reach every C file, including
# PROXY resets (proxy_spec) and TLS close_notify (a selection of ssl_spec,
# which takes minutes whole under memcheck). Usage: valgrind.sh CORE_SO.
# busted re-executes itself, so memcheck starts the interpreter it would
# run; core.so is preloaded to keep its frames named after lua_close.
# Prints failures and memcheck's reports; exits non-zero on either.
set -o pipefail
core=$1
run() {
  LD_PRELOAD=$core valgrind -q --error-exitcode=99 --num-callers=30 \
    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
    --suppressions=tools/valgrind.supp \
    lua5.4 "$(command -v busted)" --ignore-lua -o TAP "$@" | grep -v '^ok \|^# '
}
status=0
run spec/proxy_spec.lua spec/iostream_spec.lua spec/tcpserver_spec.lua \
    spec/tcpclient_spec.lua spec/netutil_spec.lua spec/process_spec.lua || status=1
run --filter="close_notify" --filter="verified against the test CA" --filter="STARTTLS" \
    --filter="plain text" --filter="reset in the middle" --filter="truncated ClientHello" \
    --filter="Python's ssl" spec/ssl_spec.lua || status=1
[ $status = 0 ] && echo "valgrind: no error, no definite leak"
exit $status
