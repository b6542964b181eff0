#!/usr/bin/env bash
# Times the default experiment as a new user meets it: a first run that trains and stores the
# teacher, then a second run that reuses it. Uses a fresh output root so nothing stored counts.
# Usage: scripts/bench_demo.sh   (after `make install`; extra kd-train overrides may follow)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
export KD_OUTPUT_ROOT="$root"
for attempt in first second; do
  start=$(date +%s.%N)
  .venv/bin/kd-train trainer.enable_progress_bar=false "$@" > "$root/$attempt.log" 2>&1 \
    || { cat "$root/$attempt.log"; exit 1; }
  end=$(date +%s.%N)
  printf '%s run: %.1f s wall (process start to exit)\n' "$attempt" "$(echo "$end - $start" | bc)"
  grep -E "reusing stored teacher|training it now" "$root/$attempt.log" | sed 's/^.*\] - /  /'
  sed -n '/^accuracy (%)/,$p' "$root/$attempt.log" | sed 's/^/  /'
done
echo "machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())')"
