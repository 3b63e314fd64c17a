"""boxq: run shell commands in per-task sandboxes through boxq's HTTP API.

    from boxq import Client
    print(Client().run("eval-42", "ls /").output)
"""

from .client import (
    BadRequest,
    BoxqError,
    Client,
    JobState,
    NotFound,
    Result,
    ServerError,
    TooLarge,
    Unauthorized,
    Unreachable,
)

__all__ = [
    "BadRequest",
    "BoxqError",
    "Client",
    "JobState",
    "NotFound",
    "Result",
    "ServerError",
    "TooLarge",
    "Unauthorized",
    "Unreachable",
]
__version__ = "0.1.0"
