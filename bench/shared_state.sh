#!/usr/bin/env bash
# bench/shared_state.sh BENCH_DIR [OUT_DIR]
#
# Gateway CPU per request, side by side in one session: modelfleet embedded
# (SQLite, limits and holds in process), modelfleet shared (PostgreSQL +
# Redis: both servers pinned to the gateway's CPU and counted as gateway CPU,
# as the harness does for LiteLLM's PostgreSQL), and LiteLLM plain (B1).
#
# BENCH_DIR is a copy of ../shared/bench after ./setup_tools.sh and
# ./setup_litellm.sh (see its README).  Knobs: the harness's (DURATION,
# WARMUP, ROUNDS, CONCURRENCIES, SCENARIOS), SKIP_LITELLM=1, and BASELINE_BIN
# (a modelfleet command at another commit, measured embedded beside this one).
# Results: OUT_DIR/*.jsonl and a table from summarize.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$(cd "${1:?usage: $0 BENCH_DIR [OUT_DIR]}" && pwd)
OUT=${2:-$(mktemp -d /tmp/mf-shared-bench.XXXXXX)}
mkdir -p "$OUT"
export MODELFLEET_BIN=${MODELFLEET_BIN:-$ROOT/.venv/bin/modelfleet}
export ROUNDS=${ROUNDS:-2} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2}
export CONCURRENCIES=${CONCURRENCIES:-"1 16"} SCENARIOS=${SCENARIOS:-nonstream}
export MF_UNLIMITED_PLAN=1

echo "# results in $OUT"
cd "$BENCH"

# 1. embedded
D=$(./modelfleet_gw.sh prepare "$OUT/embedded")
RESULTS_FILE=$OUT/mf-embedded.jsonl ./bench_gateway.sh mf-embedded http://127.0.0.1:4000 \
  "$(cat "$D/key")" -- ./modelfleet_gw.sh serve "$D"

# 1b. optional: the same at another commit, for a before/after in one session
# (BASELINE_BIN: a modelfleet command running that commit's code)
if [[ -n ${BASELINE_BIN:-} ]]; then
  D=$(MODELFLEET_BIN=$BASELINE_BIN ./modelfleet_gw.sh prepare "$OUT/baseline")
  MODELFLEET_BIN=$BASELINE_BIN RESULTS_FILE=$OUT/mf-baseline.jsonl ./bench_gateway.sh \
    mf-baseline http://127.0.0.1:4000 "$(cat "$D/key")" -- ./modelfleet_gw.sh serve "$D"
fi

# 2. shared: PostgreSQL + Redis pinned with the gateway, counted with it
HERE=$BENCH  # lib.sh finds its tools from $HERE
. "$BENCH/lib.sh"
trap stop_all_started EXIT INT TERM
mkdir -p "$OUT/shared"
start_pinned services "${GATEWAY_CPU:-1}" "$ROOT/.venv/bin/python" "$ROOT/bench/services_up.py" "$OUT/shared"
SERVICES_PID=$LAST_PID
for _ in $(seq 1 240); do [[ -s $OUT/shared/urls.env ]] && break; sleep 0.25; done
. "$OUT/shared/urls.env"
export MODELFLEET_DATABASE_URL MODELFLEET_REDIS_URL
D=$(./modelfleet_gw.sh prepare "$OUT/shared")
before=$("$ROOT/.venv/bin/python" "$ROOT/bench/tree_cpu.py" "$SERVICES_PID")
RESULTS_FILE=$OUT/mf-shared.jsonl ./bench_gateway.sh mf-shared \
  http://127.0.0.1:4000 "$(cat "$D/key")" -- ./modelfleet_gw.sh serve "$D"
after=$("$ROOT/.venv/bin/python" "$ROOT/bench/tree_cpu.py" "$SERVICES_PID")
# Every request of the run (warm-ups included) wrote one usage row.
rows=$("$ROOT/.venv/bin/python" - <<PY
import asyncio, os
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
async def main():
    engine = create_async_engine(os.environ["MODELFLEET_DATABASE_URL"])
    async with engine.connect() as conn:
        print((await conn.execute(text("SELECT count(*) FROM usage"))).scalar())
    await engine.dispose()
asyncio.run(main())
PY
)
"$ROOT/.venv/bin/python" -c "
b, a, n = $before, $after, $rows
print(f'# shared stores (PostgreSQL + Redis): {a - b:.2f} s CPU over {n} requests = '
      f'{(a - b) * 1000 / max(1, n):.3f} ms per request, to add to mf-shared gw CPU ms/req')
" | tee "$OUT/stores-cpu.txt"
unset MODELFLEET_DATABASE_URL MODELFLEET_REDIS_URL
kill -TERM "$SERVICES_PID"; wait "$SERVICES_PID" 2>/dev/null || true

# 3. LiteLLM, plain
if [[ ${SKIP_LITELLM:-0} != 1 ]]; then
  RESULTS_FILE=$OUT/litellm-b1.jsonl ./baseline_litellm.sh plain
fi
./summarize.py "$OUT"/*.jsonl | tee "$OUT/summary.md"
