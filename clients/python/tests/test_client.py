"""The client against a real `api -dev`: every method, errors, interrupts,
and a 1,000-job batch."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
import uuid

import pytest

from boxq import BadRequest, Client, JobState, NotFound, Result, Unauthorized


def test_run_carries_cwd_and_returns_the_result(client, task_id):
    r = client.run(task_id, "cd /tmp && echo hi")
    assert isinstance(r, Result)
    assert (r.status, r.returncode, r.output, r.cwd, r.task_id) == ("completed", 0, "hi\n", "/tmp", task_id)
    assert r.sandbox_id and r.exec_id and r.finished_at and r.ok
    assert client.run(task_id, "pwd").output == "/tmp\n"
    r = client.run(task_id, "echo oops >&2; exit 3")
    assert (r.status, r.returncode, r.output, r.ok) == ("completed", 3, "oops\n", False)


def test_stdin_cwd_and_timeout(client, task_id):
    assert client.run(task_id, "tr a-z A-Z", stdin="boxq\n").output == "BOXQ\n"
    assert client.run(task_id, "pwd", cwd="/").output == "/\n"
    r = client.run(task_id, "sleep 10", timeout=1)
    assert (r.status, r.returncode) == ("timeout", 124)


def test_submit_status_and_result(client, task_id):
    job_id = client.submit(task_id, "sleep 1; echo late")
    st = client.status(job_id)
    assert isinstance(st, (JobState, Result))
    if isinstance(st, JobState):
        assert st.id == job_id and st.state in ("pending", "running")
        assert client.result(job_id) is None
    r = client.result(job_id, wait=30)
    assert r is not None and r.id == job_id and r.output == "late\n"
    # A result read again, without waiting.
    assert client.result(job_id) == r


def test_a_waiting_job_says_whom_it_waits_for(client, task_id):
    first = client.submit(task_id, "sleep 2")
    second = client.submit(task_id, "true")
    st = client.status(second)
    assert isinstance(st, JobState)
    assert (st.state, st.waiting_for, st.behind, st.ahead) == ("waiting", "turn", first, 1)
    t = client.task(task_id)
    assert t["task_id"] == task_id and t["waiting"] == 1
    assert client.result(second, wait=30).status == "completed"


def test_cancel(client, task_id):
    job_id = client.submit(task_id, "sleep 30")
    client.cancel(job_id)
    r = client.result(job_id, wait=30)
    assert (r.status, r.returncode) == ("cancelled", 130)


def test_task_and_terminate(client, task_id):
    r = client.run(task_id, "cd /tmp")
    t = client.task(task_id)
    assert t["sandbox_id"] == r.sandbox_id and t["cwd"] == "/tmp" and t["last_used"]
    out = client.terminate(task_id, wait=30)
    assert out["status"] == "terminated"
    assert client.run(task_id, "true").sandbox_recreated


def test_errors_carry_the_servers_words(client, api_url, task_id):
    with pytest.raises(BadRequest) as e:
        client.submit(task_id, "true", tmeout_s=3)
    assert e.value.status == 400 and e.value.message.startswith("invalid job: unknown field")
    with pytest.raises(BadRequest, match="task_id"):
        client.run("", "true")
    with pytest.raises(BadRequest, match="timeout_s"):
        client.submit(task_id, "true", timeout=-1)
    with pytest.raises(NotFound):
        client.result("no-such-job-" + uuid.uuid4().hex)
    with pytest.raises(NotFound):
        client.cancel("no-such-job-" + uuid.uuid4().hex)
    with pytest.raises(Unauthorized) as e:
        Client(api_url, "wrong-token").run(task_id, "true")
    assert "token" in e.value.message
    with pytest.raises(Unauthorized):
        Client(api_url, "").submit(task_id, "true")


def test_openapi_document_is_served(api_url, client):
    assert client.healthy()
    assert not Client("http://127.0.0.1:9", "t").healthy()
    with urllib.request.urlopen(api_url + "/v1/openapi.json") as resp:
        doc = json.load(resp)
    assert doc["openapi"].startswith("3.") and "/v1/jobs/{id}" in doc["paths"]


def _interrupt_main_after(seconds):
    """SIGINT to the main thread (not just the process): the blocked socket
    read returns EINTR, and Python raises KeyboardInterrupt there."""
    main = threading.main_thread().ident
    t = threading.Timer(seconds, lambda: signal.pthread_kill(main, signal.SIGINT))
    t.start()
    return t


def test_keyboard_interrupt_cancels_the_job(client, task_id):
    job_id = "py-int-" + uuid.uuid4().hex
    t = _interrupt_main_after(1.0)
    with pytest.raises(KeyboardInterrupt):
        client.run(task_id, "sleep 30", id=job_id)
    t.join()
    r = client.result(job_id, wait=30)
    assert (r.status, r.returncode) == ("cancelled", 130)


def test_batch_of_1000(client):
    tasks = ["py-batch-%d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(50)]
    jobs = [{"task_id": tasks[i % 50], "command": "echo %d" % i, "id": "b-%d-%s" % (i, uuid.uuid4().hex)} for i in range(1000)]
    bad = {"task_id": "t", "command": "true", "timout_s": 1}
    want = {j["id"]: "%d\n" % i for i, j in enumerate(jobs)}
    got = {}
    errors = []
    for r in client.batch(jobs[:500] + [bad] + jobs[500:]):
        if r.id in want:
            assert r.id not in got, "two results for " + r.id
            got[r.id] = r
        else:
            errors.append(r)
    assert len(got) == 1000
    assert all(r.status == "completed" and r.output == want[r.id] for r in got.values())
    assert len(errors) == 1 and errors[0].status == "error"
    assert errors[0].error.startswith("line 501: invalid job: unknown field")
