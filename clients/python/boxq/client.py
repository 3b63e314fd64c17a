"""The boxq HTTP API client: standard library only."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Union

__all__ = [
    "Client",
    "Result",
    "JobState",
    "BoxqError",
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "TooLarge",
    "ServerError",
    "Unreachable",
]

DEFAULT_URL = "http://127.0.0.1:8080"


class BoxqError(Exception):
    """An error of the boxq API. ``message`` is the server's words,
    ``status`` the HTTP status (0 when the server was not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BadRequest(BoxqError):
    """400: the job (or a parameter) is invalid; the message says why."""


class Unauthorized(BoxqError):
    """401: missing or wrong token (BOXQ_API_TOKEN)."""


class NotFound(BoxqError):
    """404: no such job or task."""


class TooLarge(BoxqError):
    """413: the body is larger than the API takes."""


class ServerError(BoxqError):
    """5xx: the API could not do it (Redis unreachable, ...)."""


class Unreachable(BoxqError):
    """The API could not be reached at all."""


_BY_STATUS = {400: BadRequest, 401: Unauthorized, 404: NotFound, 413: TooLarge}


@dataclass(frozen=True)
class Result:
    """A job's result, as the README's result table describes it."""

    id: str
    status: str  # completed, timeout, cancelled, error
    returncode: int
    output: str = ""
    task_id: str = ""
    cwd: str = ""
    sandbox_id: str = ""
    exec_id: str = ""
    truncated: bool = False
    output_bytes: int = 0
    output_invalid_utf8: bool = False
    sandbox_recreated: bool = False
    cwd_reset: bool = False
    rescued: bool = False
    attempts: int = 0
    queued_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    duration_ms: int = 0
    error: str = ""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Result":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("id", "")
        kw.setdefault("status", "error")
        kw.setdefault("returncode", 1)
        return cls(**kw)

    @property
    def ok(self) -> bool:
        """The command ran and exited 0."""
        return self.status == "completed" and self.returncode == 0


@dataclass(frozen=True)
class JobState:
    """Where a job without a result stands (the API's 202 answer)."""

    id: str
    state: str  # scheduled, pending, waiting, running, retrying, failed
    queue: str = ""
    task_id: str = ""
    waiting_for: str = ""
    behind: str = ""
    ahead: int = 0
    last_error: str = ""
    next_run: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "JobState":
        known = {f.name for f in fields(cls)} - {"raw"}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("id", "")
        kw.setdefault("state", "")
        return cls(raw=dict(d), **kw)


JobLike = Mapping[str, Any]


def _seconds(d: Optional[float]) -> str:
    # Milliseconds, never an exponent ("%g" writes 1e-05, which the server
    # refuses); a wait below a millisecond is no wait.
    return "%dms" % round(max(d, 0) * 1000) if d is not None else ""


class Client:
    """A client of one boxq API.

    ``url`` defaults to ``$BOXQ_URL`` (else http://127.0.0.1:8080) and
    ``token`` to ``$BOXQ_API_TOKEN``. Methods raise a :class:`BoxqError`
    subclass carrying the server's message.
    """

    # How long one long poll asks the server to wait: long enough that a
    # command costs one request, short enough that proxies keep the
    # connection.
    poll_wait = 60.0

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, *, connect_timeout: float = 10.0) -> None:
        self.url = (url or os.environ.get("BOXQ_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("BOXQ_API_TOKEN") or None
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:  # never the token
        return "Client(url=%r)" % self.url

    # -- plumbing --------------------------------------------------------

    def _request(self, method: str, path: str, *, body: Optional[bytes] = None, query: Optional[Dict[str, str]] = None,
                 timeout: float = 30.0, content_type: str = "application/json"):
        q = {k: v for k, v in (query or {}).items() if v}
        url = self.url + path + ("?" + urllib.parse.urlencode(q) if q else "")
        req = urllib.request.Request(url, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            return urllib.request.urlopen(req, timeout=max(timeout, self.connect_timeout))
        except urllib.error.HTTPError as e:
            raise self._error(e.code, e.read(64 << 10)) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
            raise Unreachable("cannot reach the boxq API at %s: %s" % (self.url, getattr(e, "reason", e))) from None

    @staticmethod
    def _error(status: int, body: bytes) -> BoxqError:
        msg = ""
        try:
            d = json.loads(body)
            if isinstance(d, dict):
                msg = str(d.get("error") or d.get("message") or "")
        except ValueError:
            msg = body.decode("utf-8", "replace").strip()
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else BoxqError)
        return cls(msg or "HTTP %d" % status, status)

    def _json(self, method: str, path: str, **kw) -> tuple:
        with self._request(method, path, **kw) as resp:
            return resp.status, json.loads(resp.read())

    @staticmethod
    def _job(task_id: str, command: str, cwd: Optional[str], timeout: Optional[float], stdin: Optional[str],
             image: Optional[str], extra: Mapping[str, Any]) -> Dict[str, Any]:
        j: Dict[str, Any] = {"task_id": task_id}
        j.update(Client._job_fields(command, cwd, timeout, stdin, image))
        j.update(extra)
        return j

    @staticmethod
    def _job_fields(command: Optional[str], cwd: Optional[str], timeout: Optional[float], stdin: Optional[str],
                    image: Optional[str]) -> Dict[str, Any]:
        """The job fields given: a command, and the optional ones set."""
        j: Dict[str, Any] = {}
        if command is not None:
            j["command"] = command
        if cwd:
            j["cwd"] = cwd
        if timeout is not None:
            j["timeout_s"] = timeout
        if stdin is not None:
            j["stdin"] = stdin
        if image:
            j["image"] = image
        return j

    # -- jobs ------------------------------------------------------------

    def submit(self, task_id: str, command: str, *, cwd: Optional[str] = None, timeout: Optional[float] = 60,
               stdin: Optional[str] = None, image: Optional[str] = None, **fields_: Any) -> str:
        """Enqueue a job and return its id. ``fields_`` are other job fields
        (``id``, ``queue``, ``persistent``, ``cpu``, ...)."""
        job = self._job(task_id, command, cwd, timeout, stdin, image, fields_)
        _, d = self._json("POST", "/v1/jobs", body=json.dumps(job).encode())
        return d["id"]

    def run(self, task_id: str, command: str, *, cwd: Optional[str] = None, timeout: Optional[float] = 60,
            stdin: Optional[str] = None, image: Optional[str] = None, **fields_: Any) -> Result:
        """Enqueue a job and wait for its result. A KeyboardInterrupt while
        waiting cancels the job, then propagates."""
        job = self._job(task_id, command, cwd, timeout, stdin, image, fields_)
        # The id is chosen here, so that an interrupt at any moment, even
        # before the API answered, can cancel the job.
        job.setdefault("id", str(uuid.uuid4()))
        wait = min(self.poll_wait, (timeout or 60) + 30)
        try:
            status, d = self._json("POST", "/v1/jobs", body=json.dumps(job).encode(),
                                   query={"wait": _seconds(wait)}, timeout=wait + 30)
            if status == 200:
                return Result.from_json(d)
            while True:
                r = self.result(job["id"], wait=self.poll_wait)
                if r is not None:
                    return r
        except KeyboardInterrupt:
            self._cancel_quietly(job["id"])
            raise

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.cancel(job_id)
        except BoxqError:
            pass

    def result(self, job_id: str, wait: Optional[float] = None) -> Optional[Result]:
        """The job's result, or None while it has none (after waiting up to
        ``wait`` seconds for it)."""
        status, d = self._json("GET", "/v1/jobs/" + urllib.parse.quote(job_id, safe=""),
                               query={"wait": _seconds(wait) if wait else ""}, timeout=(wait or 0) + 30)
        return Result.from_json(d) if status == 200 else None

    def status(self, job_id: str) -> Union[Result, JobState]:
        """The job's result when it has one, else where it stands."""
        status, d = self._json("GET", "/v1/jobs/" + urllib.parse.quote(job_id, safe=""))
        return Result.from_json(d) if status == 200 else JobState.from_json(d)

    def cancel(self, job_id: str) -> None:
        """Cancel a job: a pending one never runs, a running one is killed;
        its result is ``cancelled``, rc 130."""
        self._json("POST", "/v1/jobs/%s/cancel" % urllib.parse.quote(job_id, safe=""))

    def terminate(self, task_id: str, *, if_idle: bool = False, wait: Optional[float] = None) -> Dict[str, Any]:
        """End a task's sandbox now: its running and waiting jobs end
        ``cancelled``. ``if_idle``: only when nothing of the task runs or
        waits. With ``wait``, returns what the worker did."""
        _, d = self._json("POST", "/v1/tasks/%s/terminate" % urllib.parse.quote(task_id, safe=""),
                          query={"if_idle": "true" if if_idle else "", "wait": _seconds(wait) if wait else ""},
                          timeout=(wait or 0) + 30)
        return d

    def task(self, task_id: str) -> Dict[str, Any]:
        """A task's sandbox id, cwd, last use and waiting jobs."""
        return self._json("GET", "/v1/tasks/" + urllib.parse.quote(task_id, safe=""))[1]

    def batch(self, jobs: Iterable[JobLike], *, wait: float = 24 * 3600) -> Iterator[Result]:
        """Enqueue many jobs (dicts with the job's fields) in one request and
        yield each result as it finishes. A job the API refuses yields an
        ``error`` result whose ``error`` names its line (1-based) and why.
        The results stream: they are not gathered in memory."""
        body = b"".join(json.dumps(dict(j)).encode() + b"\n" for j in jobs)
        accepted: Dict[str, int] = {}
        done = set()
        resp = self._request("POST", "/v1/jobs/batch", body=body, query={"wait": _seconds(wait)},
                             timeout=wait + 60, content_type="application/x-ndjson")
        with resp:
            for raw in resp:
                if not raw.strip():
                    continue
                d = json.loads(raw)
                if "result" in d:
                    r = Result.from_json(d["result"])
                    done.add(r.id)
                    yield r
                elif "error" in d:
                    yield Result(id=d.get("id", ""), status="error", returncode=1,
                                 error="line %d: %s" % (d.get("line", 0), d["error"]))
                elif "id" in d:
                    accepted[d["id"]] = d.get("line", 0)
        # The wait ended (or the stream broke) before every result: fetch
        # the rest one by one.
        for job_id in accepted:
            if job_id in done:
                continue
            while True:
                r = self.result(job_id, wait=self.poll_wait)
                if r is not None:
                    yield r
                    break

    # -- schedules -------------------------------------------------------

    def schedule(self, name: str, cron: str, *, task: Optional[str] = None, tasks: Optional[str] = None,
                 command: Optional[str] = None, tz: Optional[str] = None, terminate: bool = False,
                 cwd: Optional[str] = None, timeout: Optional[float] = None, if_idle: bool = False,
                 stdin: Optional[str] = None, image: Optional[str] = None,
                 job: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Add or replace the recurring schedule ``name``, as ``enqueue
        -schedule`` does: each tick of ``cron`` (``"0 3 * * *"``,
        ``"@every 30s"``, read in ``tz``, default UTC) runs ``command`` in
        ``task``, or in every task whose sandbox matches the glob ``tasks``;
        with ``terminate`` it ends their sandboxes instead (``if_idle``: only
        the idle ones). Workers run it within one reap tick. Returns the
        schedule as stored, with its ``next`` tick. A bad spec or zone raises
        :class:`BadRequest` with the CLI's words. ``job`` adds any other
        field of the README's job JSON (``queue``, ``persistent``,
        ``memory_mib``, …) to the command's job."""
        if not name:
            raise ValueError("a schedule needs a name")
        body: Dict[str, Any] = {"cron": cron}
        if tz:
            body["tz"] = tz
        if task is not None:
            body["task"] = task
        if tasks is not None:
            body["tasks"] = tasks
        if terminate:
            body["terminate"] = True
        if if_idle:
            body["if_idle"] = True
        fields: Dict[str, Any] = dict(job or {})
        fields.update(self._job_fields(command, cwd, timeout, stdin, image))
        if fields:
            # The server says what is missing (a command, say).
            body["job"] = fields
        _, d = self._json("PUT", "/v1/schedules/" + urllib.parse.quote(name, safe=""), body=json.dumps(body).encode())
        return d

    def schedules(self) -> List[Dict[str, Any]]:
        """Every schedule, by name, as ``enqueue -schedules`` lists them:
        ``name``, ``cron``, ``tz``, ``task`` or ``tasks``, ``job`` or
        ``terminate``, ``next``, and ``last`` (the last tick's run, absent
        before the first) with ``results`` (its jobs counted by outcome,
        such as ``{"completed rc 0": 3}``)."""
        return self._json("GET", "/v1/schedules")[1]["schedules"]

    def unschedule(self, name: str) -> None:
        """Remove a schedule; :class:`NotFound` when it is not set. Jobs its
        ticks enqueued are left as they are."""
        with self._request("DELETE", "/v1/schedules/" + urllib.parse.quote(name, safe="")) as resp:
            resp.read()

    def healthy(self) -> bool:
        """Whether the API answers and its Redis does."""
        try:
            return self._json("GET", "/healthz")[0] == 200
        except BoxqError:
            return False
