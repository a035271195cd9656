#!/usr/bin/env bash
# Measures what a user gets on real captcha folders: `python train.py --data_dir FOLDER` with no other
# flag (plus --out), one folder after another, each timed; then the scores in a table.
#
#   bash tools/realsets.sh                      # the three sets in ../shared/realsets
#   EXTRA="--limit 500" OUT=runs/real500 bash tools/realsets.sh tjsp5   # the 500-image case, one set
#
# Resumable in slices: a folder whose run has written metrics.json is skipped, and one whose run was
# interrupted (Ctrl-C, or `pkill -INT -f train.py`: train.py saves crnn_ctc_resume.keras) carries on
# with `train.py --resume`, so after a stop the same command goes on where it was. Its wall seconds add up.
set -u
cd "$(dirname "$0")/.."  # the repository root: train.py and .venv are there
root=${REALSETS:-../shared/realsets}
out=${OUT:-runs/real}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for set in ${@:-tjsp5 henan4 captchads4}; do
  [ -f "$out/$set/metrics.json" ] && continue
  if [ -f "$out/$set/crnn_ctc_resume.keras" ]; then
    args=(--resume --out "$out/$set")  # the interrupted run, with its own saved settings
  else
    rm -rf "$out/$set" "$out/$set.log"
    args=(--data_dir "$root/$set" --out "$out/$set" ${EXTRA:-})
  fi
  before=$(cat "$out/$set/wall_seconds" 2>/dev/null || echo 0)
  start=$(date +%s)
  $python train.py "${args[@]}" >> "$out/$set.log" 2>&1
  mkdir -p "$out/$set"
  echo "$(( before + $(date +%s) - start ))" > "$out/$set/wall_seconds"
done
$python - "$out" <<'PY'
import csv, json, sys
from pathlib import Path
print("| folder | test images | exact match | ignoring case | CER | epochs | first epoch val exact > 0.5 | wall minutes "
      "| exact, 90% most confident | exact, other 10% |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for run in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "metrics.json").exists()):
    m = json.loads((run / "metrics.json").read_text())
    t = m["test"]
    wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").exists() else "?"
    minutes = f"{int(wall) / 60:.1f}" if wall.isdigit() else "?"
    with open(run / "train_log.csv") as f:
        first = next((int(row["epoch"]) + 1 for row in csv.DictReader(f) if float(row["val_exact_match"]) > 0.5), None)
    c = m.get("confidence", {})
    ranked = (f"{c['exact_match_confident']:.4f} | {c['exact_match_rest']:.4f}" if c.get("count_rest") else "? | ?")
    print(f"| {run.name} | {t['count']} | {t['exact_match']:.4f} | {t['exact_match_ignore_case']:.4f} | {t['cer']:.4f} "
          f"| {m['epochs_run']} | {first or 'never'} | {minutes} | {ranked} |")
PY
