"""The fan-out example's steps (standard library only), by the first argument.

shard N    /in/clean/*.csv -> /out/shards/shard-1.csv .. shard-N.csv: N contiguous,
           near-equal blocks of rows, each with the header
stats      one shard (the foreach item, $MILLRACE_ITEM, alone in /in/shards/) ->
           /out/stats/<shard>.json: count, mean, min, max of each numeric column
summary    /in/stats/*.json -> /out/summary/joined.json {"shard-1": {...}, ...}
rejoin     /in/shards/*.csv -> /out/data/data.csv: the shards concatenated in order,
           i.e. the cleaned data again
"""

import csv
import json
import os
import statistics
import sys


def only_csv(directory):
    files = sorted(f for f in os.listdir(directory) if f.endswith(".csv"))
    if len(files) != 1:
        sys.exit(f"expected one CSV in {directory}, found {files}")
    return os.path.join(directory, files[0])


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def shard(n):
    header, rows = read(only_csv("/in/clean"))
    for k in range(n):
        block = rows[k * len(rows) // n : (k + 1) * len(rows) // n]
        write(f"/out/shards/shard-{k + 1}.csv", header, block)
    print(f"{len(rows)} rows in {n} shards")


def number(cell):
    try:
        return float(cell)
    except ValueError:
        return None


def stats():
    item = os.environ["MILLRACE_ITEM"]
    header, rows = read(os.path.join("/in/shards", item))
    columns = {}
    for i, name in enumerate(header):
        values = [number(r[i]) for r in rows if r[i] != ""]
        if values and all(v is not None for v in values):
            columns[name] = {
                "count": len(values),
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
            }
    os.makedirs("/out/stats", exist_ok=True)
    stem = item.rsplit(".", 1)[0]
    with open(f"/out/stats/{stem}.json", "w") as f:
        json.dump({"rows": len(rows), "columns": columns}, f, indent=2, sort_keys=True)
    with open(os.environ["MILLRACE_METRICS"], "a") as m:
        m.write(json.dumps({"name": "rows", "value": len(rows)}) + "\n")
    print(f"{item}: {len(rows)} rows, {len(columns)} numeric columns")


def summary():
    joined = {}
    for name in sorted(os.listdir("/in/stats")):
        with open(os.path.join("/in/stats", name)) as f:
            joined[name.rsplit(".", 1)[0]] = json.load(f)
    os.makedirs("/out/summary", exist_ok=True)
    with open("/out/summary/joined.json", "w") as f:
        json.dump(joined, f, indent=2, sort_keys=True)


def rejoin():
    names = sorted(os.listdir("/in/shards"), key=lambda n: int(n.split("-")[1].split(".")[0]))
    header, all_rows = None, []
    for name in names:
        h, rows = read(os.path.join("/in/shards", name))
        if header is not None and h != header:
            sys.exit(f"{name}: columns differ from the first shard's")
        header = h
        all_rows += rows
    write("/out/data/data.csv", header or [], all_rows)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "shard":
        shard(int(sys.argv[2]))
    elif mode == "stats":
        stats()
    elif mode == "summary":
        summary()
    elif mode == "rejoin":
        rejoin()
    else:
        sys.exit(f"usage: fanout.py shard N | stats | summary | rejoin (got {sys.argv[1:]})")
