"""The API socket: aiohttp on a Unix socket, translating HTTP to controller actions.

Contract: every request goes through :meth:`ApiServer.handle`, which reads
the body within ``--http-api-max-payload-size`` (refusing a larger one from
its Content-Length, without reading it), parses it with
:func:`asyncvmm.http.parse.parse_request`, runs the action on the controller
and turns the outcome into a response in :func:`to_response`, the one place
that knows the wire format: 204 without body, 200 JSON, 400/413
``{"fault_message": ...}``, always ``Server: Firecracker API``.  Binding
fails with :class:`SocketInUseError` when the path exists, as in Firecracker.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import msgspec
from aiohttp import web

from asyncvmm.controller import Controller, ControllerError
from asyncvmm.http import SocketInUseError, bind_api_socket
from asyncvmm.http.metrics import ApiMetrics
from asyncvmm.http.parse import RequestError, parse_request, split_path

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 51200
SERVER_HEADER = "Firecracker API"


class PayloadTooLargeError(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"Request payload with size {size} is larger than the limit of {limit} allowed by server."
        )


def to_response(result: Any = None, error: Exception | None = None, deprecation: str | None = None) -> web.Response:
    """The only place that maps an outcome to HTTP."""
    headers = {"Server": SERVER_HEADER}
    if deprecation:
        headers["Deprecation"] = "true"
    if error is not None:
        status = error.status if isinstance(error, ControllerError) else 400
        body = msgspec.json.encode({"fault_message": str(error)})
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")
    if result is None:
        return web.Response(status=204, headers=headers)
    return web.Response(status=200, body=msgspec.json.encode(result), headers=headers, content_type="application/json")


class ApiServer:
    def __init__(
        self,
        controller: Controller,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self.controller = controller
        self.max_payload = max_payload
        self.metrics = metrics or ApiMetrics()
        self._runner: web.ServerRunner | None = None
        self._path: str | None = None

    def low_level_server(self) -> web.Server:
        """aiohttp's bare server: no router, so no request (even one whose path holds a
        newline) is answered by anything but :meth:`handle`.  No lingering: a refused
        oversized body ends the connection at once, as in Firecracker."""
        return web.Server(self.handle, lingering_time=0)

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        length = request.content_length
        if length is not None and length > self.max_payload:
            raise PayloadTooLargeError(length, self.max_payload)
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > self.max_payload:
                raise PayloadTooLargeError(size, self.max_payload)
            chunks.append(chunk)
        return b"".join(chunks) or None

    async def handle(self, request: web.BaseRequest) -> web.Response:
        method, path = request.method, request.rel_url.raw_path
        resource = split_path(path)[0]
        deprecation = None
        try:
            body = await self._read_body(request)
            log.info("The API server received a %s request on %r.", method.capitalize(), path)
            parsed = parse_request(method, path, body)
            deprecation = parsed.deprecation
            if deprecation:
                log.warning("%s", deprecation)
                self.metrics.deprecated_api.deprecated_http_api_calls += 1
            result = await self.controller.handle(parsed.action)
        except PayloadTooLargeError as err:
            self.metrics.count(method, resource, failed=True)
            response = to_response(error=err)
            response.force_close()  # the unread body makes the connection unusable
            return response
        except (RequestError, ControllerError) as err:
            self.metrics.count(method, resource, failed=True)
            log.error("Received Error. Status code: %s. Message: %s", getattr(err, "status", 400), err)
            return to_response(error=err, deprecation=deprecation)
        except Exception as err:  # a bug must cost one request, never the process
            log.exception("Internal error while handling %s %s", method, path)
            self.metrics.count(method, resource, failed=True)
            self.metrics.api_server.sync_response_fails += 1
            return to_response(error=ControllerError(f"Internal error: {err}"))
        self.metrics.count(method, resource, failed=False)
        return to_response(result, deprecation=deprecation)

    async def start(self, path: str, sock: socket.socket | None = None) -> None:
        """Serve on ``sock``, a socket already bound to ``path``, or bind ``path`` now
        (refusing an existing one with :class:`SocketInUseError`)."""
        if sock is None:
            sock = bind_api_socket(path)
        self._path = path
        self._runner = web.ServerRunner(self.low_level_server(), handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info("Listening on API socket (%r).", path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None
