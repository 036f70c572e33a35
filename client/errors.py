"""The client's errors; each carries the exit code `quantlora-run` ends with."""
from __future__ import annotations

from typing import Any


class ClientError(Exception):
    exit_code = 1


class WorkflowError(ClientError):
    """The workflow file or an override is wrong (nothing was sent to the server)."""
    exit_code = 2


class ServerError(ClientError):
    """The server could not be reached or answered something unexpected."""
    exit_code = 4


class ValidationError(ClientError):
    """POST /prompt answered 400: the server's validation errors are in .body."""
    exit_code = 1

    def __init__(self, message: str, body: Any = None):
        super().__init__(message)
        self.body = body


class ExecutionError(ClientError):
    """The prompt was queued and failed (or was interrupted) while running: .data is the server's message."""
    exit_code = 1

    def __init__(self, message: str, data: dict | None = None, prompt_id: str | None = None):
        super().__init__(message)
        self.data, self.prompt_id = data or {}, prompt_id


class RunTimeout(ClientError):
    exit_code = 3

    def __init__(self, message: str, prompt_id: str | None = None):
        super().__init__(message)
        self.prompt_id = prompt_id
