"""The SDK's exceptions, in one place.

An :class:`ApiError` is the VMM's answer (its status and ``fault_message``);
the other errors are about reaching the VMM or the VMM process itself.
"""

from __future__ import annotations


class ApiError(Exception):
    """The API answered with an error (400/413, or anything the spec does not allow)."""

    def __init__(self, status: int, fault_message: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {fault_message}")
        self.status = status
        self.fault_message = fault_message
        self.method = method
        self.path = path


class ApiConnectionError(ConnectionError):
    """The API socket could not be reached (missing, refused, or the connection dropped)."""

    def __init__(self, method: str, path: str, cause: BaseException) -> None:
        super().__init__(f"{method} {path}: {cause}")
        self.method = method
        self.path = path


class ApiTimeoutError(TimeoutError):
    """No complete answer within the client's timeout."""

    def __init__(self, method: str, path: str, timeout: float) -> None:
        super().__init__(f"{method} {path}: no answer within {timeout} s")
        self.method = method
        self.path = path
        self.timeout = timeout


class VmmExitedError(RuntimeError):
    """The VMM process ended while the SDK was waiting for it (API socket, console text)."""

    def __init__(self, returncode: int, waiting_for: str, output: str) -> None:
        tail = output[-2000:]
        super().__init__(f"the VMM exited with {returncode} while waiting for {waiting_for}; "
                         f"its last output:\n{tail}")
        self.returncode = returncode
        self.output = output


class ConsoleTimeoutError(TimeoutError):
    """The console did not show the awaited text in time."""

    def __init__(self, pattern: str, timeout: float, console: str) -> None:
        super().__init__(f"no {pattern!r} on the console within {timeout} s; it shows:\n{console[-2000:]}")
        self.pattern = pattern
        self.timeout = timeout
        self.console = console
