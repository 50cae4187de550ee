"""API latency with a large history: fills a state dir with N runs (each with 4 steps,
attempts, outputs and metrics, written straight into the daemon's SQLite schema after the
daemon has created it), restarts the daemon on it, and times GET /api/v1/runs/{id} and
GET /api/v1/runs?limit=50 (plus a filtered page) from a client on the same machine.

usage: api.py MILLRACE_BINARY WORKDIR"""
import json, os, random, sqlite3, statistics, subprocess, sys, time, urllib.request

bin_, work = sys.argv[1], sys.argv[2]
n_runs = int(os.environ.get("BENCH_RUNS", "10000"))
reps = int(os.environ.get("BENCH_REQUESTS", "300"))
os.makedirs(f"{work}/pipelines", exist_ok=True)
with open(f"{work}/millrace.toml", "w") as f:
    f.write('pipelines = "pipelines"\nstate_dir = "state"\n[api]\nlisten = "127.0.0.1:0"\n')

def start():
    try:
        os.remove(f"{work}/state/daemon.json")
    except FileNotFoundError:
        pass
    p = subprocess.Popen([bin_, "daemon", "--config", f"{work}/millrace.toml"],
                         stderr=open(f"{work}/daemon.log", "a"))
    for _ in range(200):
        try:
            return p, json.load(open(f"{work}/state/daemon.json"))["url"]
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    sys.exit("the daemon did not start")

p, _ = start()  # creates the schema
p.terminate(); p.wait()

db = sqlite3.connect(f"{work}/state/millrace.db")
db.execute("PRAGMA journal_mode=WAL")
now = int(time.time() * 1000)
digest = lambda i: f"{i:064x}"
db.execute("INSERT OR IGNORE INTO definitions VALUES ('d', 'bench', 'bench.toml', '', ?)", (now,))
rows_runs, rows_steps, rows_att, rows_art, rows_out, rows_met = [], [], [], [], [], []
pipelines = [f"bench-{k}" for k in range(20)]
for r in range(1, n_runs + 1):
    t = now - (n_runs - r) * 60_000
    status = "succeeded" if r % 17 else "failed"
    rows_runs.append((r, pipelines[r % 20], "bench", "d", "{}", "cron 0 * * * *", None, 0, status, t, t, t + 5000, None, None, None))
    for s in range(4):
        name = f"step-{s}"
        reused = r - 1 if (s < 2 and r > 1) else None
        rows_steps.append((r, name, s, "wasm", "reused" if reused else status, digest(r * 10 + s), None, reused, 1, t + s * 1000, t + s * 1000 + 900, None, None))
        rows_att.append((r, name, 1, status, t + s * 1000, t + s * 1000 + 900, 0, None, f"{work}/state/logs/{r}/{name}.1.log"))
        rows_art.append((digest(r * 10 + s), 1000, 1, t))
        rows_out.append((r, name, "out", digest(r * 10 + s)))
        rows_met.append((r, name, "auc", random.random(), None, 0))
db.executemany("INSERT INTO runs (id, pipeline, experiment, definition, params, trigger, trigger_detail, no_reuse, status, created_at, started_at, finished_at, error, warnings, module_pins) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows_runs)
db.executemany("INSERT INTO steps (run_id, name, position, runtime, status, cache_key, key_parts, reused_from, attempts, started_at, finished_at, error, module) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows_steps)
db.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?,?)", rows_att)
db.executemany("INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?)", rows_art)
db.executemany("INSERT INTO step_outputs VALUES (?,?,?,?)", rows_out)
db.executemany("INSERT INTO metrics VALUES (?,?,?,?,?,?)", rows_met)
db.commit(); db.close()

p, url = start()
token = open(f"{work}/state/api-token").read().strip()

def timed(path):
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        body = r.read()
        assert r.status == 200, (path, r.status)
    return (time.perf_counter() - t0) * 1000, len(body)

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))]

results = {}
for label, make in [
    ("run detail  GET /api/v1/runs/{id}", lambda: f"/api/v1/runs/{random.randint(1, n_runs)}"),
    ("runs list   GET /api/v1/runs?limit=50", lambda: "/api/v1/runs?limit=50"),
    ("runs list   ?pipeline=…&status=failed&limit=50", lambda: f"/api/v1/runs?pipeline=bench-{random.randint(0, 19)}&status=failed&limit=50"),
    ("runs list   page deep in history (before=…)", lambda: f"/api/v1/runs?limit=50&before={random.randint(100, n_runs)}"),
]:
    for _ in range(10):
        timed(make())  # warm up
    samples = [timed(make()) for _ in range(reps)]
    ms = [s[0] for s in samples]
    results[label] = (statistics.median(ms), pct(ms, 0.99), max(ms), statistics.median([s[1] for s in samples]))
p.terminate(); p.wait()
print(f"API latency with {n_runs} runs ({4 * n_runs} steps) in the database; {reps} requests each, one client")
print(f"{'request':<48} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bytes':>8}")
for label, (p50, p99, mx, size) in results.items():
    print(f"{label:<48} {p50:>8.2f} {p99:>8.2f} {mx:>8.2f} {size:>8.0f}")
