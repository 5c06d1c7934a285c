#!/usr/bin/env bash
# The accuracy suite: `fastkd distill` on every dataset we have, same settings, one report each.
#
#   bash bench/accuracy/run_suite.sh dev   # choose defaults: test splits set aside unread (--dev)
#   bash bench/accuracy/run_suite.sh test  # the chosen defaults, evaluated on the test splits
#
# Two datasets run at a time, one torch thread each (2-core machines). Environment: SEEDS,
# DATASETS, ABLATIONS, EXTRA (more distill flags), OUT. Reports land in
# runs/accuracy/<mode>/<dataset>/; `python bench/accuracy/summarize.py runs/accuracy/<mode>` tabulates them.
# test mode takes 3+ hours on 2 cores (every student and plain DNN trains once per dropout candidate);
# an interrupted dataset continues with DATASETS=<name> EXTRA="--resume" (a dataset not started: without it).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:?usage: run_suite.sh dev|test}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-2}
PY=${PY:-.venv/bin/python}
S=${SHARED_DATA:-../shared/data}
# test mode writes the published reports; dev mode scratch space
if [ "$MODE" = test ]; then OUT=${OUT:-docs/results}; else OUT=${OUT:-runs/accuracy/$MODE}; fi
mkdir -p "$OUT"
$PY bench/accuracy/prepare_data.py --shared "$S" --out runs/data >/dev/null
case $MODE in
  dev)  FLAGS=(--dev); ABL=${ABLATIONS:-"gate=logit+gate_fit=joint,gate=logit+gate_fit=stacked,teacher_folds=3,augment=0,monitor_fraction=0.2+monitor_window=1"} ;;
  # one row per option switched back to its old value (each row has its epoch and teacher cost);
  # the mean student, every run's second row, is the gate's ablation
  test) FLAGS=(); ABL=${ABLATIONS:-"gate=logit+gate_fit=joint,augment=0,monitor_fraction=0.2+monitor_window=1"} ;;
  *) echo "mode must be dev or test" >&2; exit 2 ;;
esac
declare -A DATA=(
  [frappe]="--data libfm:$S/frappe/frappe.validation.libfm.gz,$S/frappe/frappe.test.libfm.gz"
  [frappe_log]="--data csv:runs/data/frappe_log.csv.gz --label label"
  [synthetic]="--data synthetic:100000"
  [segmented]="--data segmented:100000 --segment-field segment"
  [criteo]="--data criteo:$S/criteo/criteo_train.txt.gz,$S/criteo/criteo_dev.txt.gz,$S/criteo/criteo_test.txt.gz"
  [avazu]="--data avazu:$S/avazu/avazu_train.csv.gz,$S/avazu/avazu_dev.csv.gz,$S/avazu/avazu_test.csv.gz"
)
# cross-fitting triples the teachers' cost: measured on the small samples only (Frappe-size runs
# of it are in docs/accuracy.md, from the dev round)
# segment experts: the check that a per-sample gate beats averaging where teachers do differ
declare -A MORE=([criteo]="teacher_folds=3" [avazu]="teacher_folds=3" [segmented]="segments")
ORDER=${DATASETS:-"frappe frappe_log synthetic segmented criteo avazu"}
run_one() {
  local name=$1
  local abl=$ABL
  if [ -n "${MORE[$name]:-}" ] && [ "$MODE" = test ] && [ -z "${ABLATIONS:-}" ]; then abl="$abl,${MORE[$name]}"; fi
  # shellcheck disable=SC2086
  $PY -m fastkd distill ${DATA[$name]} "${FLAGS[@]}" --seeds "$SEEDS" --threads 1 \
      ${abl:+--ablations "$abl"} ${EXTRA:-} --out "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    && echo "done $name" || echo "FAILED $name (see $OUT/$name.log)"
}
for name in $ORDER; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  run_one "$name" &
done
wait
if [ "$MODE" = test ]; then
  # the cross-dataset summary, and README's results table from it
  $PY bench/accuracy/summarize.py "$OUT" --markdown "$OUT/SUMMARY.md" --readme README.md
else
  $PY bench/accuracy/summarize.py "$OUT" --markdown "$OUT/SUMMARY.md"
fi
