"""Schedules through the client against a real `api -dev`: set, list,
replace, remove, and errors in the CLI's words. (That a schedule's ticks run
is tested in Go, TestSchedulesRoutes: the dev worker reads schedules every
30 s.)"""

from __future__ import annotations

import uuid

import pytest

from boxq import BadRequest, Client, NotFound, Unauthorized


@pytest.fixture
def name():
    return "py-sched-" + uuid.uuid4().hex[:12]


def _named(client, name):
    return [s for s in client.schedules() if s["name"] == name]


def test_schedule_list_replace_unschedule(client, name, task_id):
    s = client.schedule(name, "0 3 * * *", task=task_id, command="echo hi", tz="Europe/Paris", cwd="/tmp", timeout=30)
    assert (s["name"], s["cron"], s["tz"], s["task"]) == (name, "0 3 * * *", "Europe/Paris", task_id)
    # The job's own task_id is empty: each tick gives it its task.
    assert s["job"] == {"task_id": "", "command": "echo hi", "cwd": "/tmp", "timeout_s": 30}
    # The next tick is read in the zone: 03:00 Paris time.
    assert s["next"][11:19] == "03:00:00" and s["next"][-6:] in ("+01:00", "+02:00")
    assert s["updated_at"] and "last" not in s

    listed = _named(client, name)
    assert len(listed) == 1 and listed[0]["job"]["command"] == "echo hi" and listed[0]["next"] == s["next"]

    # The same name replaces it: a nightly cleanup of the idle sandboxes.
    s = client.schedule(name, "@every 30m", tasks="eval-*/**", terminate=True, if_idle=True)
    assert (s["tasks"], s["terminate"], s["if_idle"]) == ("eval-*/**", True, True)
    assert "job" not in s and "task" not in s and "tz" not in s
    assert _named(client, name)[0]["cron"] == "@every 30m"

    client.unschedule(name)
    assert _named(client, name) == []
    with pytest.raises(NotFound, match="no such schedule"):
        client.unschedule(name)


def test_schedule_errors_carry_the_clis_words(client, api_url, name, task_id):
    with pytest.raises(BadRequest) as e:
        client.schedule(name, "61 * * * *", task=task_id, command="true")
    assert e.value.status == 400 and e.value.message.startswith('invalid schedule: cron spec "61 * * * *"')
    with pytest.raises(BadRequest, match='unknown time zone "Mars/Olympus"'):
        client.schedule(name, "@daily", task=task_id, command="true", tz="Mars/Olympus")
    with pytest.raises(BadRequest, match="either a task"):
        client.schedule(name, "@daily", command="true")
    with pytest.raises(BadRequest, match="needs a command"):
        client.schedule(name, "@daily", task=task_id)
    with pytest.raises(BadRequest, match="runs no command"):
        client.schedule(name, "@daily", tasks="**", terminate=True, command="true")
    with pytest.raises(BadRequest, match="invalid job: .*command"):
        client.schedule(name, "@daily", task=task_id, cwd="/tmp")
    with pytest.raises(BadRequest, match="timeout_s"):
        client.schedule(name, "@daily", task=task_id, command="true", timeout=-1)
    with pytest.raises(BadRequest, match="name"):
        client.schedule("a b", "@daily", task=task_id, command="true")
    assert _named(client, name) == []
    with pytest.raises(Unauthorized):
        Client(api_url, "wrong-token").schedules()
    with pytest.raises(Unauthorized):
        Client(api_url, "wrong-token").schedule(name, "@daily", task=task_id, command="true")


def test_schedule_takes_the_whole_job(client, name, task_id):
    s = client.schedule(name, "@daily", task=task_id, command="cat", stdin="in\n", image="python:3.11",
                        job={"queue": "default", "persistent": False, "memory_mib": 256})
    job = s["job"]
    assert (job["command"], job["stdin"], job["image"]) == ("cat", "in\n", "python:3.11")
    assert (job["queue"], job["persistent"], job["memory_mib"]) == ("default", False, 256)
    with pytest.raises(BadRequest, match="unknown field"):
        client.schedule(name, "@daily", task=task_id, command="true", job={"no_such_field": 1})
    with pytest.raises(ValueError, match="needs a name"):
        client.schedule("", "@daily", task=task_id, command="true")
    client.unschedule(name)
