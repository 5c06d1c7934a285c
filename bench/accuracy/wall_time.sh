#!/usr/bin/env bash
# Wall time of the default `fastkd distill` on Frappe: this checkout against another commit (the
# defaults issue 13 started from, by default), side by side, one torch thread each; the base run
# is repeated while the head run lasts, so both always share the machine. Prints the wall times
# and the ratio of the head run to the median base run.
#
#   bash bench/accuracy/wall_time.sh [BASE_COMMIT]     # default: adb85a8^ (before the #13 defaults)
#
# BASE_COMMIT is checked out into a temporary worktree and its extensions built there; nothing of
# this checkout is changed. Outputs: runs/wall_time/{base,head}/ (reports, logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${1:-adb85a8^}
PY=$(pwd)/.venv/bin/python
S=${SHARED_DATA:-../shared/data}
OUT=$(pwd)/runs/wall_time
WT=$(mktemp -d /tmp/fastkd-base.XXXXXX)
trap 'git worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$WT" "$BASE" >/dev/null
(cd "$WT" && $PY setup.py build_ext --inplace >/dev/null 2>&1)
rm -rf "$OUT" && mkdir -p "$OUT"
# the data path is relative to each checkout's parent: give both the absolute one
ABS_DATA="libfm:$(realpath "$S")/frappe/frappe.validation.libfm.gz,$(realpath "$S")/frappe/frappe.test.libfm.gz"
run() {  # label, checkout
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$2" && PYTHONPATH="$2" $PY -m fastkd distill --data "$ABS_DATA" --threads 1 --out "$OUT/$1" \
      > "$OUT/$1.log" 2>&1)
  t1=$(date +%s.%N)
  echo "$1 $(echo "$t1 - $t0" | bc)" > "$OUT/$1.seconds"
}
run head "$(pwd)" &
HEAD_PID=$!
# the base run again while the head run lasts, so that the head never has the machine to itself
# (it is the slower one); every finished base run counts, and the median is compared
k=0
while :; do
  run base "$WT"
  cp "$OUT/base.seconds" "$OUT/base.$k.seconds"; k=$((k + 1))
  kill -0 $HEAD_PID 2>/dev/null || break
done
wait
b=$(cat "$OUT"/base.*.seconds | cut -d' ' -f2 | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
h=$(cut -d' ' -f2 "$OUT/head.seconds")
echo "base runs: $(cat "$OUT"/base.*.seconds | cut -d' ' -f2 | xargs printf '%.0f s ')"
printf "base %s (%s), median: %.0f s\nhead %s: %.0f s\nratio head/base: %.2f\n" "$BASE" "$(git rev-parse --short "$BASE")" "$b" \
  "$(git rev-parse --short HEAD)" "$h" "$(echo "$h / $b" | bc -l)"
