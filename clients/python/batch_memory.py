#!/usr/bin/python3
"""Memory of the API process during one large streamed batch.

Starts the same real stack as bench.py (redis-server, cmd/gateway with
-isolation none, cmd/worker, cmd/api), sends --jobs `true` jobs over --tasks
tasks in one POST /v1/jobs/batch?wait=… through Client.batch, reads the
results as they stream (counting them, keeping none), and samples the API's
resident memory from /proc every 200 ms. Prints the peak (VmHWM), the RSS
at the end of the enqueue and at the last result, and the timings.

    /usr/bin/python3 clients/python/batch_memory.py [--jobs 100000] [--tasks 500]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import subprocess
import tempfile
import threading
import time

from bench import REPO, TOKEN, Stack
from boxq import Client


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--bin", help="directory with built gateway, worker and api")
    args = ap.parse_args()
    bindir = pathlib.Path(args.bin) if args.bin else pathlib.Path(tempfile.mkdtemp(prefix="boxq-bin-"))
    if not args.bin:
        subprocess.run(["go", "build", "-o", str(bindir) + "/", "./cmd/gateway", "./cmd/worker", "./cmd/api"], cwd=REPO, check=True)
    stack = Stack(bindir, None, "none", ("-max-sandboxes", str(args.tasks + 16)))
    pid = stack.api_proc.pid
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), rss_kib(pid)))
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    try:
        rss_idle = rss_kib(pid)
        t.start()
        jobs = ({"task_id": "mem-%d" % (i % args.tasks), "command": "true"} for i in range(args.jobs))
        by_status = collections.Counter()
        t0 = time.monotonic()
        first = None
        for r in Client(stack.api, TOKEN).batch(jobs):
            if first is None:
                first = time.monotonic()
            by_status[r.status] += 1
        t1 = time.monotonic()
        rss_end = rss_kib(pid)
        peak = rss_kib(pid, "VmHWM")
    finally:
        stop.set()
        stack.close()
    out = {
        "jobs": args.jobs, "tasks": args.tasks, "results": sum(by_status.values()), "by_status": dict(by_status),
        "seconds_total": round(t1 - t0, 1), "seconds_to_first_result": round((first or t1) - t0, 1),
        "api_rss_idle_mib": round(rss_idle / 1024, 1), "api_rss_peak_mib": round(peak / 1024, 1),
        "api_rss_at_end_mib": round(rss_end / 1024, 1),
        "api_rss_max_sampled_mib": round(max(s for _, s in samples) / 1024, 1) if samples else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
