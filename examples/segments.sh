#!/usr/bin/env bash
# One load test split over N segments that start together, then merged into one result.
#
#   examples/segments.sh N SCENARIO [run flags...]
#       N local processes (one machine, N processes: each runs its share)
#   HOSTS="gen1 gen2 gen3" examples/segments.sh 3 SCENARIO [run flags...]
#       one segment per host over ssh (stormlight on each host's PATH, the scenario copied to
#       the same path there); the result files are copied back with scp
#
# The run flags describe the whole test (-u 300 -r 30 -t 5m --host ...): each segment runs its
# exact share. Results go to $OUT (default results/), merged into $OUT/merged.json and
# $OUT/report.html; the exit code is the merged thresholds' verdict (report's).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
n=$1 scenario=$2
shift 2
out=${OUT:-results}
bin=${STORMLIGHT:-stormlight}
read -r -a hosts <<<"${HOSTS:-}"
if [ ${#hosts[@]} -gt 0 ] && [ ${#hosts[@]} -ne "$n" ]; then
  echo "HOSTS names ${#hosts[@]} hosts for $n segments" >&2
  exit 2
fi
mkdir -p "$out"
# Everyone starts at the same second: time enough to start N processes (and ssh in).
start_at=$(( $(date +%s) + ${START_DELAY:-5} ))
pids=()
for ((i = 0; i < n; i++)); do
  args=(run "$scenario" "$@" --segment "$i/$n" --start-at "$start_at" --quiet)
  if [ ${#hosts[@]} -gt 0 ]; then
    ssh "${hosts[$i]}" "$bin" "$(printf '%q ' "${args[@]}")" --out "/tmp/stormlight-seg-$i.json" \
      >"$out/seg-$i.txt" 2>&1 &
  else
    "$bin" "${args[@]}" --out "$out/seg-$i.json" >"$out/seg-$i.txt" 2>&1 &
  fi
  pids+=($!)
done
failed=0
for ((i = 0; i < n; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "segment $i/$n failed: see $out/seg-$i.txt" >&2
    failed=1
  fi
  if [ ${#hosts[@]} -gt 0 ]; then
    scp -q "${hosts[$i]}:/tmp/stormlight-seg-$i.json" "$out/seg-$i.json" || failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
files=()
for ((i = 0; i < n; i++)); do files+=("$out/seg-$i.json"); done
exec "$bin" report "${files[@]}" --out "$out/merged.json" --html "$out/report.html"
