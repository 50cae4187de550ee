#!/usr/bin/env python3
"""millrace daemon benchmark: idle footprint and trigger latencies (see bench/README.md).

Driven by bench/daemon.sh:  daemon.py WORK_DIR MILLRACE_BIN NOOP_WASM

Phases, all in one daemon process (one fresh state dir):
  idle  50 pipelines loaded (25 daily cron, 15 watch, 10 without a timed trigger);
        RSS, CPU time, threads and context switches of the daemon over BENCH_IDLE_SECS
  api   POST /api/v1/pipelines/bench-api/runs, one at a time: send -> step started_at
  drop  a new file in a watched dir (debounce 500ms): write -> run created_at
  cron  a `*/1 * * * * *` pipeline: scheduled instant -> step started_at
  idle  again, after the runs (BENCH_IDLE_AFTER_SECS, default BENCH_IDLE_SECS): the wasm
        runtime now exists (it is created by the first wasm step)
Step 2-4 pipelines are added to the pipelines dir after the idle window (hot reload),
so the 50 idle pipelines stay loaded. Exit 1 if a run fails or a number is missing.
"""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime

IDLE_SECS = float(os.environ.get("BENCH_IDLE_SECS", "60"))
IDLE_AFTER_SECS = float(os.environ.get("BENCH_IDLE_AFTER_SECS", str(IDLE_SECS)))
IDLE_PIPELINES = int(os.environ.get("BENCH_IDLE_PIPELINES", "50"))
CRON_FIRINGS = int(os.environ.get("BENCH_CRON_FIRINGS", "30"))
API_RUNS = int(os.environ.get("BENCH_API_RUNS", "50"))
DROP_RUNS = int(os.environ.get("BENCH_DROP_RUNS", "10"))
PHASES = os.environ.get("BENCH_PHASES", "idle api drop cron").split()
DEBOUNCE_MS = 500
SETTLE_MS = 200  # daemon/src/trigger/watch.rs SETTLE: files must hold still this long
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Targets (informational; they do not change the exit code).
TARGET_RSS_MB = 30.0
TARGET_IDLE_CPU_PCT = 0.1  # "≈ 0": at most 60 ms of CPU per idle minute
TARGET_LAT_MS = 50.0

work, binary, noop = sys.argv[1], sys.argv[2], sys.argv[3]
pipelines_dir = os.path.join(work, "pipelines")
state_dir = os.path.join(work, ".state")
log_path = os.path.join(work, "daemon.log")
# No proxy, even if http_proxy is set: the daemon is on 127.0.0.1.
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
problems = []  # failed runs, missing numbers: any -> exit 1


def say(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def now_ms():
    return time.time() * 1000.0  # CLOCK_REALTIME, the clock the daemon stamps rows with


# ---------------------------------------------------------------- pipelines


def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # the pipelines dir watcher sees one complete file


def step(name="a", reuse=True):
    return f'\n[[step]]\nname = "{name}"\nwasm = "{noop}"\n' + ("" if reuse else "reuse = false\n")


def idle_pipelines(n):
    """n pipelines: half daily cron, 30% watch (one dir each), the rest none/after."""
    n_cron, n_watch = n // 2, (n * 3) // 10
    out = {}
    for i in range(1, n + 1):
        if i <= n_cron:
            name = f"idle-cron-{i:02}"
            trig = '[[trigger]]\ncron = "0 3 * * *"\n'
        elif i <= n_cron + n_watch:
            name = f"idle-watch-{i:02}"
            os.makedirs(os.path.join(pipelines_dir, f"w{i:02}"), exist_ok=True)
            trig = f'[[trigger]]\nwatch = "w{i:02}/*.csv"\ndebounce = "2s"\n'
        elif i % 2:
            name = f"idle-manual-{i:02}"
            trig = ""
        else:
            name = f"idle-after-{i:02}"
            trig = '[[trigger]]\nafter = "idle-cron-01"\n'
        text = f'name = "{name}"\ndescription = "daemon bench: idle"\n\n[params]\nk = {i}\n\n{trig}'
        text += step("a") + step("b").replace('name = "b"', 'name = "b"\nafter = ["a"]')
        out[name] = text
    return out, n_cron, n_watch, n - n_cron - n_watch


# ---------------------------------------------------------------- daemon + API

daemon = None
url = None
token = None


def start_daemon():
    global daemon, url, token
    with open(os.path.join(work, "millrace.toml"), "w") as f:
        f.write('pipelines = "pipelines"\nstate_dir = ".state"\nshutdown_grace = "5s"\n'
                '\n[api]\nlisten = "127.0.0.1:0"\n')
    env = dict(os.environ, MILLRACE_LOG=os.environ.get("MILLRACE_LOG", "info"))
    for k in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    t0 = time.monotonic()
    daemon = subprocess.Popen([binary, "daemon", "--config", os.path.join(work, "millrace.toml")],
                              cwd=work, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    with open(os.path.join(work, "daemon.pid"), "w") as f:
        f.write(f"{daemon.pid}\n")
    endpoint = os.path.join(state_dir, "daemon.json")
    while True:
        if daemon.poll() is not None:
            fail_hard(f"the daemon exited with {daemon.returncode} before it was ready")
        try:
            with open(endpoint) as f:
                url = json.load(f)["url"]
            break
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() - t0 > 60:
            fail_hard("the daemon was not ready after 60 s")
        time.sleep(0.01)
    ready = time.monotonic() - t0
    with open(os.path.join(state_dir, "api-token")) as f:
        token = f.read().strip()
    return ready


def stop_daemon():
    if daemon is None or daemon.poll() is not None:
        return None
    daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        return "killed"


def fail_hard(msg):
    say(msg)
    tail_log()
    stop_daemon()
    sys.exit(1)


def tail_log(n=30):
    try:
        lines = open(log_path).read().splitlines()[-n:]
    except OSError:
        return
    print("  daemon log (tail):", file=sys.stderr)
    for l in lines:
        print("    " + l, file=sys.stderr)


def call(method, path, body=None):
    """(status, json); the token on every call."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with http.open(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def get(path):
    status, v = call("GET", path)
    if status != 200:
        fail_hard(f"GET {path}: HTTP {status}: {v}")
    return v


def wait_loaded(name, loaded=True, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = call("GET", f"/api/v1/pipelines/{name}")
        if (status == 200) == loaded:
            return
        time.sleep(0.05)
    fail_hard(f"pipeline {name} was not {'loaded' if loaded else 'unloaded'} after {timeout} s")


DONE = {"succeeded", "failed", "cancelled", "interrupted", "skipped"}


def wait_done(run_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        r = get(f"/api/v1/runs/{run_id}")
        if r["status"] in DONE:
            return r
        if time.monotonic() > deadline:
            fail_hard(f"run {run_id} did not finish in {timeout} s: {r['status']}")
        time.sleep(0.02)


def first_step_start(r):
    starts = [s["started_at"] for s in r.get("steps", []) if s.get("started_at") is not None]
    return min(starts) if starts else None


def check_run(r, phase):
    if r["status"] != "succeeded":
        problems.append(f"{phase}: run {r['id']} ended {r['status']}: {r.get('error')}")
        return False
    if first_step_start(r) is None:
        problems.append(f"{phase}: run {r['id']} has no step started_at")
        return False
    return True


# ---------------------------------------------------------------- /proc


def proc_sample(pid):
    """Process-wide numbers, and per-thread (comm -> [ticks, switches])."""
    st = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.strip()
    kb = lambda k: int(st[k].split()[0]) if k in st else 0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
    threads, switches = {}, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
            comm = s[s.index("(") + 1:s.rindex(")")]
            tf = s.rsplit(")", 1)[1].split()
            sw = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        sw += int(line.split()[1])
        except (OSError, ValueError):
            continue  # the thread ended
        threads[tid] = (comm, int(tf[11]) + int(tf[12]), sw)
        switches += sw
    return {
        "t": time.monotonic(), "rss": kb("VmRSS"), "hwm": kb("VmHWM"), "anon": kb("RssAnon"),
        "file": kb("RssFile"), "shmem": kb("RssShmem"), "vsz": kb("VmSize"),
        "threads": int(st.get("Threads", "0")), "ticks": ticks, "switches": switches,
        "per_thread": threads,
    }


def mb(kb):
    return kb / 1024.0


def idle_phase(n, secs):
    pid = daemon.pid
    time.sleep(2)  # let the watch triggers take their first look (settle + hash)
    a = proc_sample(pid)
    say(f"idle: {secs:.0f} s window, {n} pipelines, {a['threads']} threads, RSS {mb(a['rss']):.1f} MB")
    peak_rss, end = a["rss"], time.monotonic() + secs
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        peak_rss = max(peak_rss, proc_sample(pid)["rss"])
    b = proc_sample(pid)
    wall = b["t"] - a["t"]
    cpu_s = (b["ticks"] - a["ticks"]) / CLK_TCK
    busy, switches = [], 0
    for tid, (comm, ticks, sw) in b["per_thread"].items():
        _, t0, s0 = a["per_thread"].get(tid, (comm, 0, 0))
        switches += sw - s0  # threads that ended in the window are not counted
        if ticks - t0 or sw - s0:
            busy.append((ticks - t0, sw - s0, comm, tid))
    busy.sort(reverse=True)
    comms = {}
    for comm, _, _ in b["per_thread"].values():
        comms[comm] = comms.get(comm, 0) + 1
    return {
        "n": n, "wall": wall, "start": a, "end": b, "peak_rss": peak_rss,
        "cpu_s": cpu_s, "cpu_pct": 100.0 * cpu_s / wall,
        "switches_per_s": switches / wall,
        "busy_threads": busy[:8], "comms": comms,
    }


# ---------------------------------------------------------------- latency phases


def pct(xs, p):
    """Nearest-rank percentile: with fewer than 100 samples, p99 is the max."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100.0 * len(s)) - 1)]


def summary(xs):
    if not xs:
        return None
    return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs),
            "min": min(xs), "mean": statistics.fmean(xs)}


def api_phase():
    write(os.path.join(pipelines_dir, "bench-api.toml"),
          'name = "bench-api"\ndescription = "daemon bench: REST trigger"\n' + step(reuse=False))
    wait_loaded("bench-api")
    # Warm-up (not measured): the first run compiles noop.wasm into the module cache.
    status, v = call("POST", "/api/v1/pipelines/bench-api/runs", {})
    if status != 202:
        fail_hard(f"POST bench-api runs: HTTP {status}: {v}")
    check_run(wait_done(v["run_id"]), "api warm-up")
    rows = []
    for i in range(API_RUNS):
        time.sleep(0.1)  # the previous run's tail (log flush, WAL) is over
        sent = now_ms()
        status, v = call("POST", "/api/v1/pipelines/bench-api/runs", {})
        back = now_ms()
        if status != 202:
            problems.append(f"api: POST {i + 1}: HTTP {status}: {v}")
            continue
        time.sleep(0.03)
        r = wait_done(v["run_id"])
        if check_run(r, "api"):
            s = first_step_start(r)
            rows.append({"rtt": back - sent, "lat": s - sent, "queue": r["created_at"] - sent,
                         "dispatch": s - r["created_at"]})
    say(f"api: {len(rows)}/{API_RUNS} runs measured")
    return rows


def drop_phase():
    os.makedirs(os.path.join(pipelines_dir, "drop"), exist_ok=True)
    write(os.path.join(pipelines_dir, "bench-drop.toml"),
          'name = "bench-drop"\ndescription = "daemon bench: file drop"\n\n'
          f'[[trigger]]\nwatch = "drop/*.csv"\ndebounce = "{DEBOUNCE_MS}ms"\n' + step(reuse=False))
    wait_loaded("bench-drop")
    time.sleep(1.5)  # its first look (settle + hash) sets the baseline: no run
    seen = {r["id"] for r in get("/api/v1/runs?pipeline=bench-drop&limit=1000")["runs"]}
    if seen:
        problems.append(f"drop: {len(seen)} run(s) before any file was dropped")
    rows = []
    for i in range(DROP_RUNS):
        path = os.path.join(pipelines_dir, "drop", f"f{i + 1:03}.csv")
        with open(path, "w") as f:
            f.write(f"i,t\n{i},{time.time_ns()}\n")
        wrote = now_ms()  # after close: the last inotify event is before this
        deadline = time.monotonic() + 30
        new = []
        time.sleep((DEBOUNCE_MS + SETTLE_MS) / 1000.0 - 0.05)
        while not new:
            runs = get("/api/v1/runs?pipeline=bench-drop&limit=1000")["runs"]
            new = [r for r in runs if r["id"] not in seen]
            if not new and time.monotonic() > deadline:
                problems.append(f"drop: no run 30 s after dropping {os.path.basename(path)}")
                break
            time.sleep(0.01)
        if not new:
            continue
        if len(new) > 1:
            problems.append(f"drop: {len(new)} runs for one file ({os.path.basename(path)})")
        seen.update(r["id"] for r in new)
        r = wait_done(new[0]["id"])
        if check_run(r, "drop"):
            rows.append({"created": r["created_at"] - wrote - DEBOUNCE_MS,
                         "step": first_step_start(r) - wrote - DEBOUNCE_MS})
        time.sleep(0.3)
    say(f"drop: {len(rows)}/{DROP_RUNS} runs measured")
    return rows


def cron_phase():
    path = os.path.join(pipelines_dir, "bench-cron.toml")
    write(path, 'name = "bench-cron"\ndescription = "daemon bench: cron every second"\n\n'
          '[[trigger]]\ncron = "*/1 * * * * *"\n' + step(reuse=False))
    wait_loaded("bench-cron")
    say(f"cron: waiting for {CRON_FIRINGS} firings (≈ {CRON_FIRINGS + 2} s)")
    deadline = time.monotonic() + CRON_FIRINGS * 2 + 30
    while True:
        runs = get("/api/v1/runs?pipeline=bench-cron&limit=1000")["runs"]
        if sum(r["status"] in DONE for r in runs) >= CRON_FIRINGS:
            break
        if time.monotonic() > deadline:
            problems.append(f"cron: only {len(runs)} firing(s) in {CRON_FIRINGS * 2 + 30} s")
            break
        time.sleep(1)
    os.remove(path)
    wait_loaded("bench-cron", loaded=False)
    runs = sorted(get("/api/v1/runs?pipeline=bench-cron&limit=1000")["runs"], key=lambda r: r["id"])
    rows = []
    for r in runs:
        r = wait_done(r["id"])
        sched = (r.get("trigger_detail") or {}).get("scheduled")
        if not sched:
            problems.append(f"cron: run {r['id']} has no trigger_detail.scheduled")
            continue
        if check_run(r, "cron"):
            at = datetime.fromisoformat(sched).timestamp() * 1000.0
            rows.append({"lat": first_step_start(r) - at, "created": r["created_at"] - at,
                         "dispatch": first_step_start(r) - r["created_at"]})
    say(f"cron: {len(rows)} firings measured")
    return rows


# ---------------------------------------------------------------- report


def verdict(ok):
    return "met" if ok else "MISSED"


def main():
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    os.makedirs(pipelines_dir, exist_ok=True)
    texts, n_cron, n_watch, n_other = idle_pipelines(IDLE_PIPELINES)
    for name, text in texts.items():
        write(os.path.join(pipelines_dir, name + ".toml"), text)
    ready = start_daemon()
    st = get("/api/v1/status")
    loaded = len(st["pipelines"])
    say(f"daemon pid {daemon.pid} ready in {ready:.2f} s at {url}: {loaded} pipelines")
    if st["invalid_files"] or loaded != IDLE_PIPELINES:
        fail_hard(f"expected {IDLE_PIPELINES} valid pipelines, got {loaded}: {st['invalid_files']}")

    idle = idle_phase(loaded, IDLE_SECS) if "idle" in PHASES else None
    results = {}
    for phase, fn in (("api", api_phase), ("drop", drop_phase), ("cron", cron_phase)):
        if phase in PHASES:
            results[phase] = fn()
    idle_after = None
    if "idle" in PHASES and IDLE_AFTER_SECS > 0 and len(PHASES) > 1:
        idle_after = idle_phase(len(get("/api/v1/status")["pipelines"]), IDLE_AFTER_SECS)
    after = proc_sample(daemon.pid)

    if os.environ.get("BENCH_STRACE") == "1":
        secs = os.environ.get("BENCH_STRACE_SECS", "20")
        say(f"strace -c -f on the idle daemon for {secs} s")
        subprocess.run(["timeout", "-s", "INT", secs, "strace", "-c", "-f", "-p", str(daemon.pid)])

    rc = stop_daemon()
    if rc != 0:
        problems.append(f"the daemon exited with {rc} on SIGTERM")

    # ------------------------------------------------------------ table
    w = sys.stdout.write
    w(f"\nmillrace daemon benchmark  {started}"
      f"  {os.cpu_count()} CPUs  ({IDLE_PIPELINES} idle pipelines: {n_cron} daily cron, "
      f"{n_watch} watch, {n_other} API/after)\n")
    w(f"daemon ready in {ready:.2f} s\n\n")
    windows = [(label, x) for label, x in (("before any run", idle), ("after the runs", idle_after)) if x]
    if windows:
        cols = "".join(f"{label:>22}" for label, _ in windows)
        secs = ", ".join(f"{x['wall']:.0f} s" for _, x in windows)
        w(f"{'idle (' + secs + ')':<32}{cols}   target\n")

        def row(label, fmt, target=""):
            w(f"  {label:<30}" + "".join(f"{fmt(x):>22}" for _, x in windows) + f"   {target}\n")

        row("RSS start / end, MB", lambda x: f"{mb(x['start']['rss']):.1f} / {mb(x['end']['rss']):.1f}")
        row("RSS max sampled, MB", lambda x: f"{mb(x['peak_rss']):.1f}  "
            + verdict(max(x["peak_rss"], x["end"]["rss"]) <= TARGET_RSS_MB * 1024), f"≤ {TARGET_RSS_MB:.0f} MB")
        row("VmHWM (peak since start), MB", lambda x: f"{mb(x['end']['hwm']):.1f}")
        row("RSS end anon / file, MB", lambda x: f"{mb(x['end']['anon']):.1f} / {mb(x['end']['file']):.1f}")
        row("CPU, % of one core", lambda x: f"{x['cpu_pct']:.3f}  " + verdict(x["cpu_pct"] <= TARGET_IDLE_CPU_PCT),
            f"≈ 0 (≤ {TARGET_IDLE_CPU_PCT} %)")
        row("CPU time in the window, s", lambda x: f"{x['cpu_s']:.2f}")
        row("context switches / s", lambda x: f"{x['switches_per_s']:.1f}")
        row("threads at the end", lambda x: f"{x['end']['threads']}")
        for label, x in windows:
            w(f"  {label}: threads " + ", ".join(f"{c} ×{k}" for c, k in sorted(x["comms"].items(), key=lambda c: -c[1])))
            if x["busy_threads"]:
                w("; ran: " + ", ".join(f"{comm} {t / CLK_TCK:.2f} s/{sw} sw" for t, sw, comm, _ in x["busy_threads"]))
            w("\n")
        w("\n")
    if results:
        w("latency, ms                             n      p50      p99      max   target        check\n")

    def line(label, xs, target=None):
        s = summary(xs)
        if s is None:
            problems.append(f"no numbers for `{label.strip()}`")
            w(f"  {label:<34} {'-':>4}\n")
            return
        t = f"p99 ≤ {target:.0f} ms" if target else ""
        c = verdict(s["p99"] <= target) if target else ""
        w(f"  {label:<34} {s['n']:4d} {s['p50']:8.1f} {s['p99']:8.1f} {s['max']:8.1f}   {t:<13} {c}\n")

    if "cron" in results:
        rows = results["cron"]
        line("cron: scheduled → step start", [r["lat"] for r in rows], TARGET_LAT_MS)
        line("  scheduled → run created", [r["created"] for r in rows])
        line("  run created → step start", [r["dispatch"] for r in rows])
    if "api" in results:
        rows = results["api"]
        line("REST: POST sent → step start", [r["lat"] for r in rows], TARGET_LAT_MS)
        line("  POST round-trip (202)", [r["rtt"] for r in rows])
        line("  POST sent → run created", [r["queue"] for r in rows])
        line("  run created → step start", [r["dispatch"] for r in rows])
    if "drop" in results:
        rows = results["drop"]
        line(f"drop: written → created − {DEBOUNCE_MS}ms", [r["created"] for r in rows])
        line(f"  same − {SETTLE_MS} ms settle check", [r["created"] - SETTLE_MS for r in rows])
        line(f"  written → step start − {DEBOUNCE_MS}ms", [r["step"] for r in rows])
    w(f"\nat the end: RSS {mb(after['rss']):.1f} MB, VmHWM {mb(after['hwm']):.1f} MB, "
      f"{after['threads']} threads\n")
    w("p99 is nearest-rank: with fewer than 100 samples it is the max. "
      "Targets are informational.\n")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"idle": {k: v for k, v in (idle or {}).items() if k not in ("start", "end")},
                   "idle_after": {k: v for k, v in (idle_after or {}).items() if k not in ("start", "end")},
                   "after": {k: v for k, v in after.items() if k != "per_thread"},
                   **results}, f, indent=1, default=str)
    if problems:
        w("\nFAILED:\n" + "".join(f"  {p}\n" for p in problems))
        tail_log()
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        stop_daemon()
