#!/usr/bin/env python3
"""Summarise bench/run.sh results (a TSV) as a table of medians; exit 1 on a mismatch.

usage: report.py RESULTS.tsv
"""

import csv
import statistics
import sys
from collections import defaultdict

PHASES = ["cold", "noop", "change"]
# Targets (informational; see bench/README.md): (shape, N, phase) -> max median seconds.
TARGETS = {
    ("chain", 1000, "cold"): 2.0,
    ("chain", 1000, "noop"): 0.1,
    ("fanout", 1000, "noop"): 0.1,
}


def expected(shape: str, n: int, phase: str) -> int:
    if phase == "noop":
        return 0
    if phase == "change" and shape == "fanout":
        return 2
    return n


def main(path: str) -> int:
    groups = defaultdict(list)
    order = []
    with open(path) as f:
        for r in csv.DictReader(f, delimiter="\t"):
            key = (r["shape"], int(r["n"]), r["phase"])
            if key not in groups:
                order.append(key)
            groups[key].append(r)
    order.sort(key=lambda k: (k[0], k[1], PHASES.index(k[2])))

    head = f"{'shape':<7} {'N':>5} {'phase':<7} {'reps':>4} {'wall s':>8} {'ms/step':>8} {'executed':>14} {'RSS MB':>7}  check"
    print(head)
    print("-" * len(head))
    bad = 0
    for shape, n, phase in order:
        rows = groups[(shape, n, phase)]
        wall = statistics.median(float(r["wall"]) for r in rows)
        rss = statistics.median(int(r["rss_kb"]) for r in rows if r["rss_kb"].isdigit()) / 1024 if any(
            r["rss_kb"].isdigit() for r in rows
        ) else float("nan")
        want = expected(shape, n, phase)
        got = sorted({int(r["executed"]) for r in rows})
        statuses = sorted({r["status"] for r in rows})
        ok = got == [want] and statuses == ["succeeded"]
        bad += not ok
        got_s = ",".join(map(str, got))
        check = "OK" if ok else "MISMATCH" + ("" if statuses == ["succeeded"] else f" ({','.join(statuses)})")
        print(
            f"{shape:<7} {n:>5} {phase:<7} {len(rows):>4} {wall:>8.3f} {wall / n * 1000:>8.3f} "
            f"{f'{got_s} ({want})':>14} {rss:>7.1f}  {check}"
        )

    lines = []
    for (shape, n, phase), limit in TARGETS.items():
        rows = groups.get((shape, n, phase))
        if rows:
            wall = statistics.median(float(r["wall"]) for r in rows)
            verdict = "met" if wall <= limit else "MISSED"
            lines.append(f"  {shape} N={n} {phase}: {wall:.3f}s (target <= {limit}s) {verdict}")
    if lines:
        print("\ntargets (informational):")
        print("\n".join(lines))
    print("\nms/step = median wall / N; executed = distinct counts over reps (expected).")
    if bad:
        print(f"\n{bad} row(s) MISMATCH", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
