#!/bin/bash
# bench/studies/bulk_modes.sh [ROUNDS]: bulk echo's spread within one server process.
# Each round starts examples/echo.lua afresh, then runs 64 KiB-line bulk
# for 1.5 s three times, echo d16 for 1 s, bulk three times, churn for 1 s,
# bulk twice, and prints the eight GB/s figures. Needs bench/build/loadgen
# (make bench builds it). Used for round 3 (git history of docs/PERFORMANCE.md).
set -eu
cd "$(dirname "$0")/../.."
LOADGEN=bench/build/loadgen
for round in $(seq "${1:-3}"); do
  port=$((19500 + RANDOM % 400))
  build/luahost examples/echo.lua --port "$port" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  bulk() { "$LOADGEN" --port "$port" --mode bulk --duration 1.5 --warmup 0.3 | sed -E 's/.*gbps=([0-9.]+).*/\1/'; }
  out="round $round:"
  for _ in 1 2 3; do out="$out $(bulk)"; done
  "$LOADGEN" --port "$port" --mode echo --conns 50 --depth 16 --duration 1 --warmup 0 >/dev/null
  for _ in 1 2 3; do out="$out $(bulk)"; done
  "$LOADGEN" --port "$port" --mode churn --conns 50 --duration 1 --warmup 0 >/dev/null
  for _ in 1 2; do out="$out $(bulk)"; done
  kill "$server"
  wait "$server" 2>/dev/null || true
  echo "$out GB/s"
done
