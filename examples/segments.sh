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
# $OUT/report.html.
# Exit code: report's (0 every threshold held on the whole test, 1 one failed); 2 when a
# segment refused its input (then every segment is stopped before the start: no user sends;
# a scenario's setup() runs in each segment at once unless you pass --setup-data from
# `stormlight setup`); 4 when a segment failed during the run.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,16p' "$0" >&2
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
    # -tt: the remote segment gets a terminal, so it ends (SIGHUP) when this ssh is killed.
    ssh -tt "${hosts[$i]}" "$bin" "$(printf '%q ' "${args[@]}")" --out "/tmp/stormlight-seg-$i.json" \
      >"$out/seg-$i.txt" 2>&1 &
  else
    "$bin" "${args[@]}" --out "$out/seg-$i.json" >"$out/seg-$i.txt" 2>&1 &
  fi
  pids+=($!)
done
# Bad input (a scenario error, too few users for N segments...) ends a segment before the
# start: if any has ended by then, stop them all before they send anything.
while [ "$(date +%s)" -lt $((start_at - 1)) ]; do
  sleep 0.2
  for ((i = 0; i < n; i++)); do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "segment $i/$n ended before the start: $(tail -n 1 "$out/seg-$i.txt")" >&2
      kill "${pids[@]}" 2>/dev/null || true
      wait || true
      exit 2
    fi
  done
done
failed=0
for ((i = 0; i < n; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "segment $i/$n failed: see $out/seg-$i.txt" >&2
    failed=4
  fi
  if [ ${#hosts[@]} -gt 0 ]; then
    scp -q "${hosts[$i]}:/tmp/stormlight-seg-$i.json" "$out/seg-$i.json" || failed=4
  fi
done
[ "$failed" -eq 0 ] || exit "$failed"
files=()
for ((i = 0; i < n; i++)); do files+=("$out/seg-$i.json"); done
exec "$bin" report "${files[@]}" --out "$out/merged.json" --html "$out/report.html"
