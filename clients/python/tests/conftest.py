"""Fixtures: a real `api -dev` process (embedded Redis, reference gateway and
worker), built from this repository's Go source unless BOXQ_API_BIN names a
built binary."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import threading

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CLIENT_DIR = HERE.parent
REPO = CLIENT_DIR.parent.parent
sys.path.insert(0, str(CLIENT_DIR))

TOKEN = "pytest-token-5bq2"


@pytest.fixture(scope="session")
def api_bin(tmp_path_factory):
    b = os.environ.get("BOXQ_API_BIN")
    if b:
        return b
    out = tmp_path_factory.mktemp("bin") / "api"
    subprocess.run(["go", "build", "-o", str(out), "./cmd/api"], cwd=REPO, check=True)
    return str(out)


@pytest.fixture(scope="session")
def api_url(api_bin):
    env = dict(os.environ, BOXQ_API_TOKEN=TOKEN)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([api_bin, "-dev", "-addr", "127.0.0.1:0", "-log-format", "json", "-log-level", "warn"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    url = None
    stderr_lines = []
    # The API prints its address once it serves; its logs go to stderr.
    t = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    t.start()
    for line in proc.stdout:
        if "listening on " in line:
            url = line.strip().rsplit(" ", 1)[-1]
            break
    if url is None:
        proc.kill()
        raise RuntimeError("api -dev did not start: " + "".join(stderr_lines))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def client(api_url):
    from boxq import Client

    return Client(api_url, TOKEN)


@pytest.fixture
def task_id(request):
    import uuid

    return "py-%s-%s" % (request.node.name[:40], uuid.uuid4().hex[:8])
