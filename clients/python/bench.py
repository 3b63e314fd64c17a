#!/usr/bin/python3
"""Latency of one command through boxq from Python, next to a direct client.

Starts a real stack from this repository (redis-server, cmd/gateway,
cmd/worker, cmd/api; built here with `go build`), then runs `sleep 0.01`
one at a time, --runs times each, alternating:

  boxq    Client.run(task, "sleep 0.01"): POST /v1/jobs?wait=… to the API,
          which enqueues the job and answers when the worker's result is
          published (the API's shared subscriber).
  direct  the seed's protocol, as hermes-agent's managed Modal client speaks
          it (tools/environments/managed_modal.py + modal_utils.py): one
          sandbox created up front, then per command POST …/execs (done if
          the start answers a final status), else GET …/execs/{id} at once
          and every 250 ms until it is final. No ?waitMs (that client sends
          none). Like that client it opens a new connection per request.

once per gateway setting: the default -start-wait (a start waits up to
50 ms for its exec, so a 10 ms command is answered by the start), and
-start-wait 0 (a start always answers "running") when cmd/gateway has the
flag. Prints p50/p99 per path and setting, and a JSON line.

    /usr/bin/python3 clients/python/bench.py [--runs 200] [--isolation auto]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

from boxq import Client  # noqa: E402

TOKEN = "bench-" + uuid.uuid4().hex
FINAL = {"completed", "failed", "cancelled", "timeout"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("%s exited with %s" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("%s did not listen on %d" % (what, port))


class Stack:
    def __init__(self, bindir: pathlib.Path, start_wait: str | None, isolation: str, gateway_args: tuple = (),
                 worker_poll: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="boxq-bench-")
        self.procs: list[subprocess.Popen] = []
        rport, gport, aport = free_port(), free_port(), free_port()
        env = dict(os.environ, GATEWAY_TOKEN=TOKEN, BOXQ_API_TOKEN=TOKEN)
        env.pop("REDIS_URL", None)
        redis_url = "redis://127.0.0.1:%d/0" % rport
        self.gateway = "http://127.0.0.1:%d" % gport
        self.api = "http://127.0.0.1:%d" % aport
        self._start(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", self.dir], env, rport, "redis-server")
        gw = [str(bindir / "gateway"), "-addr", "127.0.0.1:%d" % gport, "-state-dir", self.dir + "/gw",
              "-isolation", isolation, "-log-level", "warn", "-log-format", "json"]
        if start_wait is not None:
            gw += ["-start-wait", start_wait]
        gw += list(gateway_args)
        self._start(gw, env, gport, "gateway")
        wargs = [str(bindir / "worker"), "-redis", redis_url, "-gateway", self.gateway,
                 "-log-level", "warn", "-log-format", "json"]
        if worker_poll:
            wargs += ["-poll-interval", worker_poll]
        w = subprocess.Popen(wargs, env=env, stderr=subprocess.DEVNULL)
        self.procs.append(w)
        self.api_proc = self._start([str(bindir / "api"), "-addr", "127.0.0.1:%d" % aport, "-redis", redis_url,
                     "-log-level", "warn", "-log-format", "json"], env, aport, "api")

    def _start(self, argv, env, port, what):
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, what)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Direct:
    """A gateway client following the seed's protocol (start, then poll
    every 250 ms), as hermes-agent's managed Modal environment does."""

    poll_interval = 0.25

    def __init__(self, url: str, task: str) -> None:
        self.url = url
        body = {"image": "python:3.11", "cwd": "/root", "cpu": 1, "memoryMiB": 5120, "timeoutMs": 3_600_000,
                "idleTimeoutMs": 300_000, "persistentFilesystem": True, "logicalKey": task}
        self.sandbox = self._req("POST", "/v1/sandboxes", body, {"x-idempotency-key": str(uuid.uuid4())}, 60)["id"]

    def _req(self, method, path, body=None, headers=None, timeout=10):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Authorization", "Bearer " + TOKEN)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def run(self, command: str, timeout: int = 60) -> dict:
        exec_id = str(uuid.uuid4())
        body = self._req("POST", "/v1/sandboxes/%s/execs" % self.sandbox,
                         {"execId": exec_id, "command": command, "cwd": "/root", "timeoutMs": timeout * 1000})
        if body.get("status") in FINAL:
            return body
        while True:
            body = self._req("GET", "/v1/sandboxes/%s/execs/%s" % (self.sandbox, exec_id), timeout=5)
            if body.get("status") in FINAL:
                return body
            time.sleep(self.poll_interval)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def measure(stack: Stack, runs: int) -> dict:
    client = Client(stack.api, TOKEN)
    task = "bench-" + uuid.uuid4().hex[:8]
    direct = Direct(stack.gateway, "direct-" + task)
    # Warm up: the boxq task's sandbox, connections, caches.
    for _ in range(10):
        assert client.run(task, "sleep 0.01").ok
        assert direct.run("sleep 0.01").get("returncode") == 0
    lat = {"boxq": [], "direct": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        r = client.run(task, "sleep 0.01")
        lat["boxq"].append((time.perf_counter() - t0) * 1000)
        assert r.ok, r
        t0 = time.perf_counter()
        d = direct.run("sleep 0.01")
        lat["direct"].append((time.perf_counter() - t0) * 1000)
        assert d.get("returncode") == 0, d
    return {k: {"p50_ms": round(pct(v, 50), 1), "p99_ms": round(pct(v, 99), 1)} for k, v in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--isolation", default="auto", help="the gateway's -isolation")
    ap.add_argument("--worker-poll", help="the worker's -poll-interval (default: its own, 1s; idle workers are woken on enqueue, so this bounds only pickups without a wake-up)")
    ap.add_argument("--bin", help="directory with built gateway, worker and api (default: go build here)")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.py needs redis-server (apt-get install -y redis-server)")
    bindir = pathlib.Path(args.bin) if args.bin else pathlib.Path(tempfile.mkdtemp(prefix="boxq-bin-"))
    if not args.bin:
        subprocess.run(["go", "build", "-o", str(bindir) + "/", "./cmd/gateway", "./cmd/worker", "./cmd/api"], cwd=REPO, check=True)
    helptext = subprocess.run([str(bindir / "gateway"), "-h"], capture_output=True, text=True).stdout
    settings = [("default start-wait", None)]
    if "-start-wait" in helptext:
        settings.append(("-start-wait 0", "0"))
    else:
        print("cmd/gateway has no -start-wait flag here: measuring the default setting only", file=sys.stderr)
    out = {}
    for name, sw in settings:
        stack = Stack(bindir, sw, args.isolation, worker_poll=args.worker_poll)
        try:
            out[name] = measure(stack, args.runs)
        finally:
            stack.close()
    print("%-20s %-8s %9s %9s" % ("gateway", "client", "p50 ms", "p99 ms"))
    for name, res in out.items():
        for k, v in res.items():
            print("%-20s %-8s %9.1f %9.1f" % (name, k, v["p50_ms"], v["p99_ms"]))
    print(json.dumps({"runs": args.runs, "isolation": args.isolation, "worker_poll": args.worker_poll or "default", "results": out}))


if __name__ == "__main__":
    main()
