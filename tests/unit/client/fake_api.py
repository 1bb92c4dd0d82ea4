"""A fake Firecracker API server for the SDK's unit tests: an aiohttp app on a Unix socket
that records every request and answers with Firecracker's default shapes (``GET /``: the
instance info; other GETs: 200 ``{}``; PUT/PATCH: 204) unless a test sets an answer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Hook = Callable[["Recorded"], Awaitable["web.Response | None"]]


@dataclasses.dataclass
class Recorded:
    method: str
    path: str             # as sent, still percent-encoded
    raw: bytes
    headers: dict[str, str]

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw else None


class FakeApi:
    def __init__(self, vm_id: str = "anonymous-instance") -> None:
        self.vm_id = vm_id
        self.state = "Not started"
        self.requests: list[Recorded] = []
        self.answers: dict[tuple[str, str], tuple[int, bytes, dict[str, str], float]] = {}
        self.hook: Hook | None = None
        self._runner: web.AppRunner | None = None

    def answer(self, method: str, path: str, status: int, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.answers[(method, path)] = (status, payload, headers or {}, delay)

    def instance_info(self) -> dict[str, str]:
        return {"app_name": "Firecracker", "id": self.vm_id, "state": self.state, "vmm_version": "1.16.1"}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(request.method, request.raw_path, await request.read(), dict(request.headers))
        self.requests.append(rec)
        if (rec.method, rec.path) in self.answers:
            status, payload, headers, delay = self.answers[(rec.method, rec.path)]
            await asyncio.sleep(delay)
            return web.Response(status=status, body=payload,
                                headers={"Server": "Firecracker API", **headers,
                                         **({"Content-Type": "application/json"} if payload else {})})
        if self.hook is not None:
            hooked = await self.hook(rec)
            if hooked is not None:
                return hooked
        if rec.method == "GET":
            return json_response(200, self.instance_info() if rec.path == "/" else {})
        return web.Response(status=204, headers={"Server": "Firecracker API"})

    async def start(self, path: str) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, path).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def json_response(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(),
                        headers={"Server": "Firecracker API", "Content-Type": "application/json"})


def fault(message: str, status: int = 400) -> web.Response:
    return json_response(status, {"fault_message": message})
