#!/usr/bin/env python3
"""bench/run's results.csv as markdown tables: one per suite (and per image format).

    summarize.py results.csv

Each cell is the median over rounds (MB/s = 10^6 bytes/s, or IOPS) with the median p99
completion latency for the 4 KiB workloads. A ratio column "×peer" is imagenbd / peer:
the median of the per-round ratios (both measured in the same round, seconds apart),
which cancels slow drifts of machine load better than a ratio of medians; min-max of
those per-round ratios in brackets when there are 3 rounds or more.
"""
import csv
import statistics
import sys
from collections import defaultdict

TITLES = {
    "seqread": "seq read 1 MiB QD8",
    "randread": "rand read 4 KiB QD32",
    "randread-4conn": "rand read 4 KiB QD32 x 4 conn",
    "randwrite": "rand write 4 KiB QD32",
    "randrw": "randrw 70/30 64 KiB QD16",
    "nbdcopy": "nbdcopy → null:",
    "qemu-img": "qemu-img convert → tmpfs",
    "seq-cold-pass": "seq read 1 MiB QD8, cold (empty cache)",
    "seq-warm-pass": "seq read 1 MiB QD8, warm (2nd pass)",
    "seq-restart-pass": "seq read 1 MiB QD8, after a restart",
    "rand-warm": "rand read 4 KiB QD32, warm",
    "rand-cold": "rand read 4 KiB QD32, cold (empty cache)",
    "idle-0": "VmRSS, no connection",
    "idle-256": "VmRSS, 256 idle connections",
    "peak-64xQD32": "VmHWM (peak) under 64 conn x QD32 rand read",
    "rand-64conn": "rand read 4 KiB, 64 conn x QD32 (throughput)",
}
LATENCY = {"randread", "randread-4conn", "randwrite", "rand-warm", "rand-cold", "rand-64conn"}

# (heading, suite, imagenbd's server, peers, workloads)
LOCAL_WL = ["seqread", "randread", "randread-4conn", "randwrite", "randrw", "nbdcopy", "qemu-img"]
TABLES = [
    ("Local, raw image", "local", "imagenbd-raw", ["nbdkit-file", "nbdkit-memory", "qemu-nbd-raw"], LOCAL_WL),
    ("Local, dynamic VHD", "local", "imagenbd-vhd", ["qemu-nbd-vhd", "imagenbd-raw"], LOCAL_WL),
    ("Local, dynamic VDI", "local", "imagenbd-vdi", ["qemu-nbd-vdi", "imagenbd-raw"], LOCAL_WL),
    ("Remote: raw page blob in Azurite", "remote", "imagenbd-az",
     ["nbdkit-curl-1m", "nbdkit-curl-64k", "imagenbd-file"],
     ["seq-cold-pass", "seq-warm-pass", "seq-restart-pass", "rand-cold", "rand-warm"]),
    ("Resident memory (and throughput at 64 connections)", "memory", "imagenbd-raw",
     ["imagenbd-vhd", "nbdkit-file", "qemu-nbd-raw"], ["idle-0", "idle-256", "peak-64xQD32", "rand-64conn"]),
]


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def fmt_value(v, unit):
    if v is None:
        return "–"
    if unit == "IOPS":
        return f"{v / 1000:,.1f}k IOPS"
    if unit == "MiB":
        return f"{v:,.0f} MiB"
    return f"{v:,.0f} {unit}"


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    # (suite, server, workload) -> round -> (value, p99); failures are kept as status
    data = defaultdict(dict)
    units = {}
    failures = defaultdict(list)
    for r in rows:
        key = (r["suite"], r["server"], r["workload"])
        if r["status"] != "ok" or num(r["value"]) is None:
            failures[key].append(f"r{r['round']}: {r['status']}")
            continue
        data[key][r["round"]] = (num(r["value"]), num(r["p99_us"]))
        units[key] = r["unit"]
    for heading, suite, main_srv, peers, workloads in TABLES:
        servers = [main_srv] + peers
        if not any((suite, s, w) in data or (suite, s, w) in failures for s in servers for w in workloads):
            continue
        print(f"### {heading}\n")
        if suite == "memory":
            peers = []  # lower is better and the peers differ in kind: no ratios
        head = ["workload"] + servers + [f"×{p}" for p in peers]
        print("| " + " | ".join(head) + " |")
        print("|---|" + "---:|" * (len(head) - 1))
        for w in workloads:
            if not any((suite, s, w) in data or (suite, s, w) in failures for s in servers):
                continue
            cells = [TITLES.get(w, w)]
            for s in servers:
                d = data.get((suite, s, w), {})
                if not d:
                    cells.append("failed" if failures.get((suite, s, w)) else "–")
                    continue
                v = statistics.median(x[0] for x in d.values())
                cell = fmt_value(v, units[(suite, s, w)])
                p99s = [x[1] for x in d.values() if x[1]]
                if w in LATENCY and p99s:
                    cell += f", p99 {statistics.median(p99s):,.0f} µs"
                if failures.get((suite, s, w)):
                    cell += f" ({len(failures[(suite, s, w)])} failed)"
                cells.append(cell)
            mine = data.get((suite, main_srv, w), {})
            if suite == "memory":
                print("| " + " | ".join(cells) + " |")
                continue
            for p in peers:
                theirs = data.get((suite, p, w), {})
                ratios = [mine[k][0] / theirs[k][0] for k in mine if k in theirs and theirs[k][0]]
                if not ratios:
                    cells.append("–")
                    continue
                cell = f"{statistics.median(ratios):.2f}×"
                if len(ratios) >= 3:
                    cell += f" [{min(ratios):.2f}–{max(ratios):.2f}]"
                cells.append(cell)
            print("| " + " | ".join(cells) + " |")
        print()
    if suite_note := [f"{s}/{sv}/{w}: {', '.join(f)}" for (s, sv, w), f in sorted(failures.items())]:
        print("Failed runs: " + "; ".join(suite_note) + "\n")


if __name__ == "__main__":
    main()
