#!/usr/bin/env python3
"""One fio JSON result (--group_reporting) as "value,unit,p50_us,p99_us,status".

    fio_result.py RUN.json WORKLOAD

The value is MB/s (10^6 bytes/s, reads plus writes) for streaming and mixed workloads
(names starting with "seq" or "randrw"), IOPS for the 4 KiB ones. Latency is fio's
completion latency (clat) of reads, of writes for "randwrite".
"""
import json
import sys


def main():
    path, workload = sys.argv[1], sys.argv[2]
    text = open(path).read()
    # fio's nbd engine prints "fio: connected to NBD server" into the output file too.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    rd, wr = job["read"], job["write"]
    if workload.startswith(("seq", "randrw")):
        value, unit = f"{(rd['bw_bytes'] + wr['bw_bytes']) / 1e6:.1f}", "MB/s"
    else:
        value, unit = f"{rd['iops'] + wr['iops']:.0f}", "IOPS"
    side = wr if workload == "randwrite" else rd
    pct = side["clat_ns"].get("percentile", {})
    p50 = pct.get("50.000000", 0) / 1e3
    p99 = pct.get("99.000000", 0) / 1e3
    status = "ok" if job.get("error", 0) == 0 else f"fio-err{job['error']}"
    print(f"{value},{unit},{p50:.0f},{p99:.0f},{status}")


if __name__ == "__main__":
    main()
