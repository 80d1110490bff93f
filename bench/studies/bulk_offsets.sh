#!/bin/bash
# bench/studies/bulk_offsets.sh [ROUNDS]: why some bulk runs are slow.
# Each round runs the C ceiling, then examples/echo.lua with
# bench/build/writeoffsets.so preloaded, each under 2 s of 64 KiB-line bulk
# (server on CPU 0, loadgen on CPU 1), and prints per server: GB/s, server
# CPU per GB, the share of its perf samples in the kernel's copy from user
# memory (_copy_from_iter; needs perf) and, for echo.lua, the page offsets
# its large writes started at. Needs `make -C bench studies`. Used for
# docs/PERFORMANCE.md ("Where each gap goes", bulk).
set -eu
cd "$(dirname "$0")/../.."
B=bench/build
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
have_perf=$(perf record -o "$tmp/p" -- true >/dev/null 2>&1 && echo 1 || echo 0)

run() { # NAME PORT CMD...: one bulk run against the server CMD starts
  local name=$1 port=$2 server out copy=-
  shift 2
  taskset -c 0 "$@" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  if [ "$have_perf" = 1 ]; then
    perf record -q -F 2999 -p "$server" -o "$tmp/perf" -- sleep 2.4 >/dev/null 2>&1 &
  fi
  out=$(taskset -c 1 "$B/loadgen" --port "$port" --mode bulk --duration 2 --warmup 0.3 \
    --server-pid "$server")
  if [ "$have_perf" = 1 ]; then
    wait %2 2>/dev/null || true
    copy=$(perf report -i "$tmp/perf" --no-children --sort sym --stdio 2>/dev/null |
      awk '/_copy_from_iter$/ {print $1; exit}')
  fi
  kill "$server"
  wait "$server" 2>/dev/null || true
  echo "$out" | awk -v n="$name" -v c="${copy:--}" '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "  %-9s %5.2f GB/s  %.3f s/GB  _copy_from_iter %s", n, v["gbps"],
      v["srv_cpu_us"] / 1e6 / (v["bytes"] / 1e9), c }'
}

for round in $(seq "${1:-3}"); do
  echo "round $round:"
  port=$((19500 + RANDOM % 400))
  run ceiling "$port" "$B/echo_uv" "$port"
  echo
  port=$((port + 400))
  run tcpserver "$port" env WRITEOFFSETS_FILE="$tmp/offsets" LD_PRELOAD="$B/writeoffsets.so" \
    build/luahost examples/echo.lua --port "$port"
  echo "  offsets: $(sort -k2 -nr "$tmp/offsets" | head -4 | awk '{printf "%s (%s) ", $1, $2}')"
done
