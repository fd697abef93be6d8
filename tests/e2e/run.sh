#!/usr/bin/env bash
# The page end to end: starts `flipsketch serve` on the tiny test model and drives the page in
# Debian's headless Chromium with playwright-core (tests/e2e/e2e.mjs). Screenshots go to
# $E2E_ARTIFACTS (default tests/e2e/artifacts). Needs: /usr/bin/chromium, node, npm, and the
# flipsketch binary (built by `cargo test`, or set FLIPSKETCH_BIN).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FLIPSKETCH_BIN:-$root/target/debug/flipsketch}"
[ -x "$bin" ] || { echo "error: $bin not found; run cargo build -p flipsketch-cli first" >&2; exit 1; }
[ -x /usr/bin/chromium ] || { echo "error: /usr/bin/chromium not found (apt-get install chromium)" >&2; exit 1; }
cd "$root/tests/e2e"
[ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund
port="${E2E_PORT:-17860}"
jobs="$(mktemp -d)"
log="$jobs/serve.log"
# With E2E_QUEUE_URL=postgres://... the page is served by a front end of that queue and the
# jobs run in a separate `flipsketch worker`.
queue=(); pids=()
if [ -n "${E2E_QUEUE_URL:-}" ]; then
    queue=(--queue "$E2E_QUEUE_URL" --heartbeat-s 1)
    "$bin" worker "${queue[@]}" --model "$root/tests/fixtures/tiny" --scratch "$jobs/worker" \
        --output-size 128 >"$jobs/worker.log" 2>&1 &
    pids+=($!)
    export E2E_QUEUE=postgres
fi
"$bin" serve --model "$root/tests/fixtures/tiny" --port "$port" --jobs-dir "$jobs/jobs" --output-size 128 "${queue[@]}" >"$log" 2>&1 &
pid=$!
pids+=($pid)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$jobs"' EXIT
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "error: the server exited:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.2
done
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || {
    echo "error: the server never became ready" >&2; cat "$log" "$jobs"/worker.log >&2 2>/dev/null; exit 1; }
FLIPSKETCH_URL="http://127.0.0.1:$port" E2E_ARTIFACTS="${E2E_ARTIFACTS:-$root/tests/e2e/artifacts}" node e2e.mjs
