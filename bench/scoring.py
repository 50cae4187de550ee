#!/usr/bin/env python3
"""Incremental batch scoring under the daemon (see bench/README.md, "Scoring benchmark").

Driven by bench/scoring.sh:  scoring.py WORK_DIR MILLRACE_BIN COPY_WASM

For each scorer (the trivial wasm `copy` plugin, and a Python script), in one daemon
with a fresh state dir: an inbox of BENCH_INBOX files is scored cold (one `foreach`
item per file), then BENCH_DROPS times one new file is dropped into the watched inbox
and the clock runs from the rename into inbox/ to its scored file appearing in
outbox/ (a merge transfer). For each drop the run's record gives the items executed,
the score step's own time and the single item's execution (its attempt's start to
end); "overhead" is what is left: total - debounce - settle - the item's execution.
Exit 1 when a run fails, a drop does not execute exactly one item, or a number is
missing. Targets are informational.
"""

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

INBOX = int(os.environ.get("BENCH_INBOX", "1000"))
DROPS = int(os.environ.get("BENCH_DROPS", "5"))
SCORERS = os.environ.get("BENCH_SCORERS", "wasm python").split()
DEBOUNCE_MS = int(os.environ.get("BENCH_DEBOUNCE_MS", "200"))
SETTLE_MS = 200  # daemon/src/trigger/watch.rs SETTLE: a file must hold still this long
TARGET_OVERHEAD_MS = 50.0

work, binary, copy_wasm = sys.argv[1], sys.argv[2], sys.argv[3]
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
problems = []


def say(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def now_ms():
    return time.time() * 1000.0  # the clock the daemon stamps rows with


PYTHON_SCORER = """import os
name = os.environ["MILLRACE_ITEM"]
rows = open(os.path.join("/in/inbox", name)).read().splitlines()
os.makedirs("/out/scored", exist_ok=True)
with open(os.path.join("/out/scored", name), "w") as f:
    for i, row in enumerate(rows):
        f.write(f"{row},{(len(row) * 31 + i) % 7}\\n")
"""


def pipeline(scorer):
    if scorer == "wasm":
        run = f'wasm = "{copy_wasm}"\nargs = ["--out", "scored"]'
    else:
        # In a directory of its own: the code tree is part of the key, and the
        # pipeline's directory holds the inbox.
        run = 'python = { script = "score.py", code = "code" }'
    return f'''name = "score-{scorer}"

[inputs.inbox]
path = "inbox"

[[trigger]]
watch = "inbox/*.csv"
debounce = "{DEBOUNCE_MS}ms"

[[step]]
name = "score"
{run}
inputs = {{ inbox = "inputs.inbox" }}
foreach = "inputs.inbox"
outputs = ["scored"]

[[step]]
name = "deliver"
transfer = {{ from = "score.scored", to = "outbox", mode = "merge" }}
'''


class Daemon:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "pipelines"), exist_ok=True)
        with open(os.path.join(root, "millrace.toml"), "w") as f:
            f.write('pipelines = "pipelines"\nstate_dir = ".state"\nshutdown_grace = "5s"\n'
                    '\n[api]\nlisten = "127.0.0.1:0"\n')
        env = dict(os.environ, MILLRACE_LOG=os.environ.get("MILLRACE_LOG", "info"))
        for k in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        self.log = os.path.join(root, "daemon.log")
        self.proc = subprocess.Popen([binary, "daemon", "--config", "millrace.toml"],
                                     cwd=root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        with open(os.path.join(work, "daemon.pid"), "w") as f:
            f.write(f"{self.proc.pid}\n")
        endpoint = os.path.join(root, ".state", "daemon.json")
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self.fail(f"the daemon exited with {self.proc.returncode}")
            try:
                with open(endpoint) as f:
                    self.url = json.load(f)["url"]
                break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                self.fail("the daemon was not ready after 60 s")
            time.sleep(0.01)
        with open(os.path.join(root, ".state", "api-token")) as f:
            self.token = f.read().strip()

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with http.open(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def get(self, path):
        status, v = self.call("GET", path)
        if status != 200:
            self.fail(f"GET {path}: HTTP {status}: {v}")
        return v

    def wait_done(self, run_id, timeout):
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/api/v1/runs/{run_id}")
            if r["status"] not in ("queued", "running"):
                return r
            if time.monotonic() > deadline:
                self.fail(f"run {run_id} did not finish in {timeout} s")
            time.sleep(0.02)

    def latest(self, pipeline):
        runs = self.get(f"/api/v1/runs?pipeline={pipeline}&limit=1")
        runs = runs["runs"] if isinstance(runs, dict) else runs
        return runs[0] if runs else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def fail(self, msg):
        say(msg)
        try:
            for line in open(self.log).read().splitlines()[-20:]:
                print("    " + line, file=sys.stderr)
        except OSError:
            pass
        self.stop()
        sys.exit(1)


def item_execution_ms(root, run_id, item):
    """The item's attempt, start to end, from the database (read-only)."""
    db = sqlite3.connect(f"file:{os.path.join(root, '.state', 'millrace.db')}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT started_at, finished_at FROM attempts WHERE run_id = ? AND step = ?",
            (run_id, f"score[{item}]"),
        ).fetchone()
    finally:
        db.close()
    return None if not row or row[1] is None else row[1] - row[0]


def csv_rows(i):
    return "".join(f"{i},{j},{(i * 7 + j) % 13}\n" for j in range(20))


def bench(scorer):
    root = os.path.join(work, scorer)
    inbox = os.path.join(root, "pipelines", "inbox")
    outbox = os.path.join(root, "pipelines", "outbox")
    os.makedirs(inbox)
    for i in range(INBOX):
        with open(os.path.join(inbox, f"f{i:05}.csv"), "w") as f:
            f.write(csv_rows(i))
    d = Daemon(root)
    if scorer == "python":
        os.makedirs(os.path.join(root, "pipelines", "code"))
        with open(os.path.join(root, "pipelines", "code", "score.py"), "w") as f:
            f.write(PYTHON_SCORER)
    with open(os.path.join(root, "pipelines", "score.toml"), "w") as f:
        f.write(pipeline(scorer))
    name = f"score-{scorer}"
    deadline = time.monotonic() + 30
    while d.call("GET", f"/api/v1/pipelines/{name}")[0] != 200:
        if time.monotonic() > deadline:
            d.fail(f"{name} was not loaded")
        time.sleep(0.05)
    say(f"{scorer}: cold run over {INBOX} files")
    t0 = time.monotonic()
    status, v = d.call("POST", f"/api/v1/pipelines/{name}/runs", {})
    if status != 202:
        d.fail(f"POST runs: {status} {v}")
    cold = d.wait_done(v["run_id"], 3600)
    cold_s = time.monotonic() - t0
    if cold["status"] != "succeeded":
        d.fail(f"the cold run ended {cold['status']}: {cold.get('error')}")
    cold_items = (cold["steps"][0].get("items") or {}).get("executed")
    drops = []
    for k in range(DROPS):
        before = d.latest(name)["id"]
        item = f"new{k:03}.csv"
        tmp = os.path.join(root, "pipelines", f".{item}.tmp")
        with open(tmp, "w") as f:
            f.write(csv_rows(INBOX + k))
        target = os.path.join(outbox, item)
        t_drop = now_ms()
        os.replace(tmp, os.path.join(inbox, item))
        while not os.path.exists(target):
            if now_ms() - t_drop > 120_000:
                d.fail(f"{item} was not scored within 120 s")
            time.sleep(0.001)
        total = now_ms() - t_drop
        run = None
        while run is None or run["id"] == before:
            run = d.latest(name)
            time.sleep(0.01)
        r = d.wait_done(run["id"], 120)
        items = r["steps"][0].get("items") or {}
        score = r["steps"][0]
        step_ms = (score["finished_at"] or 0) - (score["started_at"] or 0)
        item_ms = item_execution_ms(root, r["id"], item)
        if r["status"] != "succeeded" or items.get("executed") != 1 or item_ms is None:
            counts = {k: v for k, v in items.items() if k != "list"}
            problems.append(f"{scorer} drop {k}: run {r['id']} {r['status']}, items {counts}")
        drops.append({
            "total": total, "executed": items.get("executed"), "reused": items.get("reused"),
            "step": step_ms, "item": item_ms or 0.0,
            "overhead": total - DEBOUNCE_MS - SETTLE_MS - (item_ms or 0.0),
        })
        time.sleep(0.3)
    d.stop()
    return {"cold_s": cold_s, "cold_items": cold_items, "drops": drops}


def main():
    results = {}
    for scorer in SCORERS:
        results[scorer] = bench(scorer)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(f"\nincremental scoring: an inbox of {INBOX} scored files, then one file dropped "
          f"({DROPS} drops per scorer, medians; debounce {DEBOUNCE_MS} ms + settle {SETTLE_MS} ms)\n")
    print("| scorer | cold run (s) | items executed per drop | reused | drop → scored (ms) "
          "| score step (ms) | the item (ms) | overhead (ms) | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scorer, r in results.items():
        ds = r["drops"]
        executed = sorted({d["executed"] for d in ds})
        reused = sorted({d["reused"] for d in ds})
        overhead = med([d["overhead"] for d in ds])
        print(f"| {scorer} | {r['cold_s']:.2f} ({r['cold_items']} items) | "
              f"{', '.join(map(str, executed))} | {', '.join(map(str, reused))} | "
              f"{med([d['total'] for d in ds]):.0f} | {med([d['step'] for d in ds]):.0f} | "
              f"{med([d['item'] for d in ds]):.0f} | {overhead:.0f} | "
              f"≤ {TARGET_OVERHEAD_MS:.0f} {'ok' if overhead <= TARGET_OVERHEAD_MS else 'MISSED'} |")
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  {p}")
        sys.exit(1)


if __name__ == "__main__":
    main()
