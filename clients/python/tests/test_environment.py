"""BoxqEnvironment: hermes-agent's BaseEnvironment shape on a real `api -dev`."""

from __future__ import annotations

import signal
import threading

from boxq.environment import BoxqEnvironment

from conftest import TOKEN


def test_execute_carries_the_shell_directory(api_url, task_id):
    env = BoxqEnvironment(task_id, cwd="/tmp", timeout=30, url=api_url, token=TOKEN)
    assert env.execute("pwd") == {"output": "/tmp\n", "returncode": 0}
    assert env.execute("cd / && false") == {"output": "", "returncode": 1}
    assert env.execute("pwd")["output"] == "/\n"
    assert env.execute("pwd", cwd="/tmp")["output"] == "/tmp\n"
    assert env.execute("cat", stdin_data="in\n") == {"output": "in\n", "returncode": 0}
    env.cleanup()


def test_timeout_is_124(api_url, task_id):
    with BoxqEnvironment(task_id, url=api_url, token=TOKEN) as env:
        r = env.execute("sleep 10", timeout=1)
    assert r["returncode"] == 124


def test_a_bad_command_is_1_with_the_reason(api_url, task_id):
    env = BoxqEnvironment(task_id, url=api_url, token=TOKEN)
    r = env.execute("true", timeout=-5)
    assert r["returncode"] == 1 and "timeout_s" in r["output"]


def test_keyboard_interrupt_is_130(api_url, task_id):
    env = BoxqEnvironment(task_id, url=api_url, token=TOKEN)
    main = threading.main_thread().ident
    t = threading.Timer(1.0, lambda: signal.pthread_kill(main, signal.SIGINT))
    t.start()
    r = env.execute("sleep 30")
    t.join()
    assert r["returncode"] == 130
    # The task goes on: its next command runs.
    assert env.execute("echo next") == {"output": "next\n", "returncode": 0}


def test_keyboard_interrupt_during_submit_cancels_the_job(api_url, task_id):
    """An interrupt that lands while the job is being submitted (the API
    has enqueued it, its answer is not read yet) still cancels the job and
    returns 130, as one while waiting does."""
    from boxq import Client

    submitted = []

    class InterruptedOnAnswer(Client):
        def submit(self, *args, **kw):
            submitted.append(super().submit(*args, **kw))
            raise KeyboardInterrupt

    env = BoxqEnvironment(task_id, client=InterruptedOnAnswer(api_url, TOKEN))
    r = env.execute("sleep 30")
    assert r["returncode"] == 130
    res = env.client.result(submitted[0], wait=30)
    assert (res.status, res.returncode) == ("cancelled", 130)
