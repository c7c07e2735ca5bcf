#!/bin/bash
# Mutations of the service's accounting: each one, applied to a copy of HEAD, must make the
# property tests of tests/service/test_accounting_properties.py fail (on SQLite); the first
# line, no mutation, must pass. Run from the repository root:
#     bash bench/accounting_mutations.sh
# Prints one line per mutation with pytest's summary. Not part of CI (several minutes).
set -u
ROOT=$(git rev-parse --show-toplevel)
export GOODPUT_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test
TREE=${TMPDIR:-/tmp}/goodput-mutations/tree
run() {
  name=$1; file=$2; old=$3; new=$4
  cd / && rm -rf "$TREE" && mkdir -p "$TREE" && git -C "$ROOT" archive HEAD | tar -x -C "$TREE"
  python3 - "$TREE/$file" "$old" "$new" <<'PY'
import sys
p, old, new = sys.argv[1], sys.argv[2], sys.argv[3]
s = open(p).read(); assert old in s, (p, old); open(p, "w").write(s.replace(old, new, 1))
PY
  cd "$TREE" && out=$(timeout 900 "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -k "sqlite and (whole or window or rolling)" tests/service/test_accounting_properties.py 2>&1 | tail -1)
  echo "$name: $out"
}
run "baseline (no mutation)" service/goodput.py "def clip(" "def clip("
run "spans summed, not unioned (SpanIndex)" service/goodput.py "out[i] = union_inside(start, end, ((spans[k].start, spans[k].end) for _, k in hits))" "out[i] = sum(clip(spans[k].start, spans[k].end, start, end) for _, k in hits)"
run "no precedence in windows (clash correction off)" service/goodput.py "    out = charged(mine, lo, hi)
    for s in mine:" "    out: dict[str, float] = {}
    for s in []:"
run "no precedence at ingest (charged = duration)" service/repository_rollups.py "            charged[i] = credit.get((spans[i].attempt, spans[i].category, spans[i].start), 0.0)" "            charged[i] = None"
run "windows ignore the whole run's commits" service/repository_windows.py "s.split(self.upto.get(attempt, math.inf), self.saved.get(attempt, -1))" "s.split(math.inf, self.saved.get(attempt, -1))"
run "a window ends attempts at its edge (no crash tail after it)" service/goodput.py "            badput[\"wasted_progress\"] += clip(d.progress, d.end, lo, hi)  # the partial step" "            badput[\"wasted_progress\"] += clip(d.progress, d.end, lo, hi) if d.end <= hi else 0.0"
run "status judged per rank" service/goodput.py "        failed = [a for a in mine if a.status == \"failed\"]" "        failed = [a for a in mine[:1] if a.status == \"failed\"]"
run "heartbeats not signs of life" service/goodput.py "        alive = max(progress, seen)  # the last sign of life" "        alive = progress"
