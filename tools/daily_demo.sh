#!/usr/bin/env bash
# The daily loop on the development set: ml-latest-small's ratings cut by time into three days
# (every rating up to the 60th, 80th and 100th percentile of timestamps: a rolling window), each
# day converted --vocab-from the day before, trained --init-from the champion, and promoted only
# when it beats the champion (README: "Every day: convert, warm-start, promote").
#   tools/daily_demo.sh [OUT]   (env: SRC, MODEL, EPOCHS, MIN_GAIN; make daily-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SRC=${SRC:-../shared/data/ml-latest-small}
OUT=$(mkdir -p "${1:-daily-demo}" && cd "${1:-daily-demo}" && pwd)
MODEL=${MODEL:-melu} EPOCHS=${EPOCHS:-auto} MIN_GAIN=${MIN_GAIN:-0.002}
URI="sqlite:///$OUT/mlflow.db"   # a fresh registry every demo
rm -f "$OUT/mlflow.db"
export TF_CPP_MIN_LOG_LEVEL=2

"$BIN/python" - "$SRC/ratings.csv" "$OUT" <<'PY'
import sys, numpy as np, pyarrow.compute as pc, pyarrow.csv as csv
events, out = sys.argv[1], sys.argv[2]
table = csv.read_csv(events)
cuts = np.percentile(table["timestamp"].to_numpy(), [60, 80, 100])
for day, cut in enumerate(cuts, 1):
    csv.write_csv(table.filter(pc.less_equal(table["timestamp"], int(cut))), f"{out}/ratings-day{day}.csv")
PY

for day in 1 2 3; do
  data="$OUT/day$day"
  vocab_from=(); init_from=()
  if [ "$day" -gt 1 ]; then vocab_from=(--vocab-from "$OUT/day$((day - 1))"); init_from=(--init-from "models:/$MODEL@champion"); fi
  "$BIN/gmeta" convert table --spec tools/specs/ml-latest-small.json --src "$SRC" \
      --input "$OUT/ratings-day$day.csv" --out "$data" --overwrite --quiet "${vocab_from[@]}"
  "$BIN/gmeta" train --model "$MODEL" --data "$data" --epochs "$EPOCHS" --tracking-uri "$URI" \
      --output-dir "$OUT/runs" --checkpoint-dir none --support-curve none "${init_from[@]}" \
      > "$OUT/train-day$day.json" 2> "$OUT/train-day$day.log"
  run=$("$BIN/python" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["run_id"])' \
        "$OUT/train-day$day.json")
  grep -h "rows loaded" "$OUT/train-day$day.log" | grep -v "plain baseline" || true
  "$BIN/gmeta" promote --run "$run" --name "$MODEL" --min-gain "$MIN_GAIN" --tracking-uri "$URI" \
      > "$OUT/promote-day$day.txt" 2> "$OUT/promote-day$day.log"
  "$BIN/python" - "$day" "$OUT/promote-day$day.txt" <<'PY'
import json, sys
p = json.loads(open(sys.argv[2]).read().splitlines()[-1])
n = lambda v, f=".4f": "-" if v is None else format(v, f)
print(f"day {sys.argv[1]}: {p['decision']} (challenger v{p['challenger_version']} {n(p['challenger_value'])}, "
      f"champion v{p['champion_version']} {n(p['champion_value'])}, gain {n(p['gain'], '+.4f')} "
      f"[{n(p['lo'], '+.4f')}, {n(p['hi'], '+.4f')}] on {p['metric']}): {p['reason']}")
PY
done
echo "models:/$MODEL@champion in $URI; each day's table: $OUT/promote-dayN.txt"
