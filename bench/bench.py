#!/usr/bin/env python3
"""Side-by-side benchmark: stormlight against wrk (and oha, when installed) on the same local
server, in one run, printing medians and the ratios its targets are stated in.

    python3 bench/bench.py [--rounds 3] [--seconds 8] [--quick]

What it does:
- installs what it needs (Debian's wrk and nginx-light; oha from crates.io with
  `cargo install oha`, skipped with --no-oha or if that fails),
- builds stormlight in release mode,
- starts nginx (bench/nginx.conf, one worker) pinned to CPU 0; every generator runs pinned to
  CPU 1, with 50 connections/users, GET /hello and POST /api/upload alternating,
- CPU per request = (user + sys time of the whole generator process) / requests it completed,
  taken from the kernel's rusage of the child (wait4), not from the tools' own reports,
- memory per user: max RSS at 10 and at 10,000 (--users-high) users on the built-in
  target's /slow?ms=1000, (RSS_high - RSS_10) / (high - 10),
- spawn: 10,000 users of the hooks example started at 10,000/s: when were all running,
- p50 on the built-in target's /slow?ms=10,
- repeats every measurement --rounds times, alternating the tools' order, and prints medians.

It sends traffic only to 127.0.0.1 and every run is bounded by --seconds.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "stormlight")
NGINX_URL = "http://127.0.0.1:18090"
TARGET_PORT = 18091
TARGET_URL = f"http://127.0.0.1:{TARGET_PORT}"
SERVER_CPU, GEN_CPU = "0", "1"
CONNS = 50

WRK_MIX = """
local i = 0
request = function()
  i = i + 1
  if i % 2 == 0 then return wrk.format("GET", "/hello") end
  return wrk.format("POST", "/api/upload", {["Content-Type"] = "application/json"}, '{"name":"test","price":10}')
end
"""
WRK_MIX_RESPONSE = WRK_MIX + """
local failed = 0
response = function(status, headers, body)
  if status ~= 200 or not body:find("{", 1, true) then failed = failed + 1 end
end
"""
SL_MIX = """
endpoints = {
  Task("GET", "/hello"),
  Task("POST", "/api/upload", { json = { name = "test", price = 10 } }),
}
"""
SL_MIX_HOOK = SL_MIX + """
function before_request(user, req)
  req.headers["X-User"] = user.id
end
"""


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, **kw)


def install(oha):
    missing = [p for p, b in (("wrk", "wrk"), ("nginx-light", "nginx")) if shutil.which(b) is None]
    if missing:
        print(f"installing {' '.join(missing)} ...", flush=True)
        sh("apt-get update -qq >/dev/null && apt-get install -y -qq " + " ".join(missing) + " >/dev/null")
    if oha and shutil.which("oha") is None:
        print("installing oha from crates.io (cargo install oha; several minutes, once) ...", flush=True)
        if subprocess.run("cargo install oha --locked --quiet", shell=True).returncode != 0:
            print("  oha did not install: running without it", flush=True)
        os.environ["PATH"] += os.pathsep + os.path.expanduser("~/.cargo/bin")
    sh(f"cd {ROOT} && cargo build --release --quiet && cargo build --release --quiet --example runtime_layout")


def measure(cmd, cpu=GEN_CPU):
    """Runs cmd pinned to `cpu`; returns (stdout, stderr)."""
    p = subprocess.Popen(["taskset", "-c", cpu] + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {err[-2000:]}")
    return out, err


def run_child(cmd, cpu=GEN_CPU):
    """Runs cmd; returns (stdout, stderr, CPU seconds of the child: user + sys, from the kernel)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out, err = measure(cmd, cpu)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out, err, cpu_s


def rss_of(cmd, cpu=GEN_CPU):
    """Max RSS (KiB) of one child, via /usr/bin/time (RUSAGE_CHILDREN's max is not per child)."""
    out, err = measure(["/usr/bin/time", "-f", "MAXRSS=%M"] + cmd, cpu)
    m = re.findall(r"MAXRSS=(\d+)", err)
    return out, err, int(m[-1])


def wrk_requests(out):
    return int(re.search(r"(\d+) requests in", out).group(1))


def wrk_p50_ms(out):
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def sl_summary(tmp, name):
    with open(os.path.join(tmp, name)) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--users-high", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s: a smoke test of the script")
    ap.add_argument("--no-oha", action="store_true", help="do not install or run oha")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 1, 4
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs: the server and the generator are pinned apart")
    install(not a.no_oha)
    tmp = tempfile.mkdtemp(prefix="stormlight-bench-")
    for name, text in (("mix.lua", WRK_MIX), ("mix_resp.lua", WRK_MIX_RESPONSE), ("sl.lua", SL_MIX), ("sl_hook.lua", SL_MIX_HOOK)):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    slow = os.path.join(tmp, "slow.lua")
    with open(slow, "w") as f:
        f.write('endpoints = { Task("GET", "/slow?ms=1000", { name = "/slow" }) }\n')
    slow_hooks = os.path.join(tmp, "slow_hooks.lua")
    with open(os.path.join(ROOT, "scripts", "hooks.lua")) as f:
        hooks = f.read()
    hooks = re.sub(r"endpoints = \{.*?\n\}", 'endpoints = {\n  Task("GET", "/slow?ms=1000", { name = "/slow" }),\n}', hooks, flags=re.S)
    with open(slow_hooks, "w") as f:
        f.write(hooks)
    slow10 = os.path.join(tmp, "slow10.lua")
    with open(slow10, "w") as f:
        f.write('endpoints = { Task("GET", "/slow?ms=10", { name = "/slow" }) }\n')

    ngx_dir = os.path.join(tmp, "nginx")
    os.makedirs(ngx_dir)
    nginx = subprocess.Popen(["taskset", "-c", SERVER_CPU, "nginx", "-p", ngx_dir, "-c", os.path.join(ROOT, "bench", "nginx.conf"),
                              "-g", f"pid {ngx_dir}/nginx.pid;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = subprocess.Popen(["taskset", "-c", SERVER_CPU, BIN, "target", "--port", str(TARGET_PORT)], stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    d = str(a.seconds)
    tools = {
        "wrk (no script, GET only)": lambda: ["wrk", "-t1", f"-c{CONNS}", f"-d{d}s", NGINX_URL + "/hello"],
        "wrk + Lua request() mix": lambda: ["wrk", "-t1", f"-c{CONNS}", f"-d{d}s", "-s", os.path.join(tmp, "mix.lua"), NGINX_URL],
        "wrk + request() + response()": lambda: ["wrk", "-t1", f"-c{CONNS}", f"-d{d}s", "-s", os.path.join(tmp, "mix_resp.lua"), NGINX_URL],
        "stormlight, no hooks": lambda: [BIN, "run", os.path.join(tmp, "sl.lua"), "--host", NGINX_URL, "-u", str(CONNS), "-t", f"{d}s", "-q",
                                         "--out", os.path.join(tmp, "out.json")],
        "stormlight, before_request hook": lambda: [BIN, "run", os.path.join(tmp, "sl_hook.lua"), "--host", NGINX_URL, "-u", str(CONNS), "-t", f"{d}s",
                                                    "-q", "--out", os.path.join(tmp, "out.json")],
        "stormlight, no hooks, live view": lambda: [BIN, "run", os.path.join(tmp, "sl.lua"), "--host", NGINX_URL, "-u", str(CONNS), "-t", f"{d}s",
                                                    "--out", os.path.join(tmp, "out.json")],
    }
    if shutil.which("oha") and not a.no_oha:
        tools["oha (GET only)"] = lambda: ["oha", "--no-tui", "-c", str(CONNS), "-z", f"{d}s", "--output-format", "json", NGINX_URL + "/hello"]

    cpu_us = {k: [] for k in tools}
    try:
        for r in range(a.rounds):
            order = list(tools) if r % 2 == 0 else list(reversed(tools))
            for name in order:
                out, err, cpu_s = run_child(tools[name]())
                if name.startswith("wrk"):
                    n = wrk_requests(out)
                elif name.startswith("oha"):
                    n = sum(int(c) for c in json.loads(out)["statusCodeDistribution"].values())
                else:
                    n = sl_summary(tmp, "out.json")["total"]["requests"]
                cpu_us[name].append(cpu_s * 1e6 / n)
                print(f"  round {r + 1}: {name}: {n} requests, {cpu_s * 1e6 / n:.2f} CPU us/request", flush=True)

        # Memory per user on a slow endpoint.
        mem = {}
        spawn = []
        hi = a.users_high
        spawn_out = os.path.join(tmp, "spawn.json")
        for label, script in (("no hooks", slow), ("hooks example", slow_hooks)):
            vals = []
            for _ in range(max(1, a.rounds // 2)):
                _, _, low = rss_of([BIN, "run", script, "--host", TARGET_URL, "-u", "10", "-r", "10000", "-t", "4s", "-q"])
                _, _, high = rss_of([BIN, "run", script, "--host", TARGET_URL, "-u", str(hi), "-r", "10000", "-t", "4s", "-q",
                                     "--out", spawn_out])
                vals.append((high - low) / (hi - 10))
                if label == "hooks example":
                    spawn.append(sl_summary(tmp, "spawn.json")["all_users_started_s"])
            mem["stormlight, " + label] = statistics.median(vals)
        _, _, low = rss_of(["wrk", "-t1", "-c10", "-d4s", TARGET_URL + "/slow?ms=1000"])
        _, _, high = rss_of(["wrk", "-t1", f"-c{hi}", "-d4s", TARGET_URL + "/slow?ms=1000"])
        mem["wrk"] = (high - low) / (hi - 10)

        # p50 on a 10 ms endpoint.
        p50 = {"wrk": [], "stormlight": []}
        for _ in range(a.rounds):
            out, _, _ = run_child(["wrk", "-t1", f"-c{CONNS}", f"-d{d}s", "--latency", TARGET_URL + "/slow?ms=10"])
            p50["wrk"].append(wrk_p50_ms(out))
            run_child([BIN, "run", slow10, "--host", TARGET_URL, "-u", str(CONNS), "-t", f"{d}s", "-q", "--out", os.path.join(tmp, "p50.json")])
            p50["stormlight"].append(sl_summary(tmp, "p50.json")["total"]["latency_ms"]["p50"])

        # The runner's layout: current-thread runtime + LocalSet against a multi-thread runtime.
        layout, _, _ = run_child([os.path.join(ROOT, "target", "release", "examples", "runtime_layout"),
                                  NGINX_URL + "/hello", str(a.seconds), "1"])
    finally:
        for p in (nginx, target):
            p.send_signal(signal.SIGTERM if p is target else signal.SIGQUIT)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in cpu_us.items()}
    print(f"\nCPU per request (median of {a.rounds} rounds, {a.seconds} s each, {CONNS} connections, server on CPU {SERVER_CPU}, generator on CPU {GEN_CPU}):")
    for k, v in med.items():
        print(f"  {k:<36} {v:6.2f} us")
    print("\nMarginal memory per user (10 -> %d users, /slow?ms=1000):" % a.users_high)
    for k, v in mem.items():
        print(f"  {k:<36} {v:6.1f} KiB")
    pw, ps = statistics.median(p50["wrk"]), statistics.median(p50["stormlight"])
    print(f"\np50 on /slow?ms=10: wrk {pw:.2f} ms, stormlight {ps:.2f} ms ({ps - pw:+.2f} ms)")
    print("\nRuntime layout (examples/runtime_layout.rs, one CPU, 50 users, GET /hello):")
    print("".join("  " + line + "\n" for line in layout.strip().splitlines()), end="")
    sl, slh, live = med["stormlight, no hooks"], med["stormlight, before_request hook"], med["stormlight, no hooks, live view"]
    print("\nTargets:")
    rows = [
        ("1a no hooks / wrk+Lua request()", sl / med["wrk + Lua request() mix"], 1.0),
        ("1b no hooks / plain wrk", sl / med["wrk (no script, GET only)"], 1.2),
        ("2  hook / wrk request()+response()", slh / med["wrk + request() + response()"], 1.0),
        ("4b live view+--out / quiet+--out", live / sl, 1.03),
    ]
    for label, ratio, limit in rows:
        print(f"  {label:<38} {ratio:5.2f}x  (target <= {limit}x) {'ok' if ratio <= limit else 'MISSED'}")
    print(f"  {'3  KiB/user, hooks example':<38} {mem['stormlight, hooks example']:5.1f}  (target <= 32) "
          f"{'ok' if mem['stormlight, hooks example'] <= 32 else 'MISSED'}")
    print(f"  {'3  KiB/user, no hooks':<38} {mem['stormlight, no hooks']:5.1f}  (target <= 8) {'ok' if mem['stormlight, no hooks'] <= 8 else 'MISSED'}")
    print(f"  {'4a p50 - wrk p50 (ms)':<38} {ps - pw:+5.2f}  (target <= +0.1) {'ok' if ps - pw <= 0.1 else 'MISSED'}")
    due = (hi - 1) / 10000
    worst = max(s if s is not None else float("inf") for s in spawn)
    print(f"  {'5  %d hook users at 10000/s, all up (s)' % hi:<38} {worst:5.2f}  (due by {due:.2f}) "
          f"{'ok' if worst <= due + 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
