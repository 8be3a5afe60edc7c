#!/bin/bash
# A 2-minute soak: 200 users against the built-in target (pinned to CPU 0; stormlight on CPU 1),
# sampling stormlight's RSS and open file descriptors every 10 s. RSS should stay flat after
# warm-up and the descriptors constant. Traffic stays on 127.0.0.1; the run ends by itself.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --quiet)
S=$ROOT/target/release/stormlight
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
cat > soak.lua <<'LUA'
endpoints = {
  Task("GET", "/hello"),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 } }),
  Task("GET", "/slow?ms=20", { name = "/slow" }),
}
LUA
taskset -c 0 $S target --port 18099 > target.log 2>&1 &
TP=$!
sleep 0.5
taskset -c 1 $S run soak.lua --host http://127.0.0.1:18099 -u 200 -r 200 -t 2m -q --out soak.json > run.log 2>&1 &
RP=$!
sleep 1
for i in $(seq 0 12); do
  rss=$(grep VmRSS /proc/$RP/status 2>/dev/null | awk '{print $2}')
  fds=$(ls /proc/$RP/fd 2>/dev/null | wc -l)
  echo "t=$((i*10))s rss_kb=$rss fds=$fds"
  sleep 10
done
wait $RP; echo "run exit=$?"
kill $TP
python3 -c "import json; d=json.load(open('soak.json')); print('requests', d['total']['requests'], 'failures', d['total']['failures'], 'rps', d['total']['rps'])"
