#!/usr/bin/env bash
# Wall time of the default `fastkd distill` on Frappe: this checkout against another commit (the
# defaults issue 13 started from, by default), side by side, one torch thread each, so both
# share the machine alike. Prints each run's wall time and the ratio.
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
rm -rf "$OUT/base" "$OUT/head" && mkdir -p "$OUT"
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
run base "$WT" &
run head "$(pwd)" &
wait
b=$(cut -d' ' -f2 "$OUT/base.seconds"); h=$(cut -d' ' -f2 "$OUT/head.seconds")
printf "base %s (%s): %.0f s\nhead %s: %.0f s\nratio head/base: %.2f\n" "$BASE" "$(git rev-parse --short "$BASE")" "$b" \
  "$(git rev-parse --short HEAD)" "$h" "$(echo "$h / $b" | bc -l)"
