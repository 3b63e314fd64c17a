"""An execution environment in the shape of hermes-agent's BaseEnvironment.

An agent that ran its commands on a Modal (or Docker, or local) environment
switches to boxq by changing the constructor::

    env = BoxqEnvironment("eval-42", image="python:3.11")
    env.execute("cd /src && pytest -x")   # {"output": ..., "returncode": ...}
    env.cleanup()
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, Optional

from .client import BoxqError, Client

__all__ = ["BoxqEnvironment"]

# The task's default directory when it has none tracked: a first command
# given another one starts there.
_BOXQ_DEFAULT_CWD = "/root"


class BoxqEnvironment:
    """Runs each command as a boxq job of one task, in the task's own
    sandbox, one at a time, with the shell's directory carried from one
    command to the next (boxq tracks it).

    Return codes are the seed's: 124 when the command timed out, 130 when
    it was cancelled or interrupted (a KeyboardInterrupt while waiting
    cancels the job), 1 with the reason in the output when boxq could not
    run it.
    """

    def __init__(self, task_id: str, image: Optional[str] = None, cwd: str = _BOXQ_DEFAULT_CWD, timeout: int = 60, *,
                 client: Optional[Client] = None, url: Optional[str] = None, token: Optional[str] = None,
                 persistent: bool = True) -> None:
        if not task_id:
            raise ValueError("BoxqEnvironment needs a task_id: it names the task's sandbox")
        self.task_id = task_id
        self.image = image
        self.cwd = cwd
        self.timeout = timeout
        self.persistent = persistent
        self.client = client or Client(url, token)
        # The constructor's cwd applies to the first command; after it boxq
        # carries the directory the last command ended in.
        self._first_cwd: Optional[str] = cwd if cwd and cwd != _BOXQ_DEFAULT_CWD else None

    def execute(self, command: str, cwd: str = "", *, timeout: Optional[int] = None,
                stdin_data: Optional[str] = None, **_compat: Any) -> Dict[str, Any]:
        """Run ``command`` and return ``{"output": str, "returncode": int}``.
        ``cwd`` overrides where it starts (else: where the task's last command
        ended). Extra keyword arguments of other environments are accepted
        and ignored."""
        start = cwd or self._first_cwd
        t = timeout or self.timeout
        # The id is chosen here, so that an interrupt while the API enqueues
        # the job (before its answer is read) can cancel it too.
        job_id = str(uuid.uuid4())
        try:
            self.client.submit(self.task_id, command, cwd=start, timeout=t, stdin=stdin_data,
                               image=self.image, persistent=self.persistent, id=job_id)
        except KeyboardInterrupt:
            return self._interrupted(job_id)
        except BoxqError as e:
            return {"output": "boxq: %s" % e.message, "returncode": 1}
        self._first_cwd = None
        try:
            while True:
                r = self.client.result(job_id, wait=min(self.client.poll_wait, t + 30))
                if r is not None:
                    break
        except KeyboardInterrupt:
            return self._interrupted(job_id)
        except BoxqError as e:
            return {"output": "boxq: %s" % e.message, "returncode": 1}
        out = r.output
        if r.status == "error" and r.error:
            out = (out + "\n" if out else "") + "boxq: " + r.error
        elif r.status == "timeout" and not out:
            out = "Command timed out after %ss" % t
        return {"output": out, "returncode": r.returncode}

    def _interrupted(self, job_id: str) -> Dict[str, Any]:
        """Cancel the job and return its cancelled result (its output so
        far), or a plain 130 if it does not come in a few seconds."""
        try:
            self.client.cancel(job_id)
            r = self.client.result(job_id, wait=5)
        except (BoxqError, KeyboardInterrupt):
            r = None
        if r is not None and r.status == "cancelled":
            return {"output": r.output or "[Command interrupted]", "returncode": 130}
        return {"output": "[Command interrupted]", "returncode": 130}

    def cleanup(self) -> None:
        """End the task's sandbox (its files are kept for the task's next
        sandbox when persistent)."""
        try:
            self.client.terminate(self.task_id)
        except BoxqError:
            pass

    def __enter__(self) -> "BoxqEnvironment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
