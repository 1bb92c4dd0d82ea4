"""A stand-in VMM executable for the SDK's process tests: Firecracker's flags, the fake API
on --api-sock, and a pretend guest on stdout/stdin.

After InstanceStart the "guest" prints ``fake-guest: booted id=<id> args=<boot_args>``
(and ``greeting=<$FAKE_VMM_GREETING>`` when set), then echoes each stdin line as
``echo:<line>`` while not paused.  ``exit=<n>`` in the boot args ends the process with
code n right after boot; ``closestdout`` closes stdout and runs on.  SendCtrlAltDel ends
it with 0 (as a guest reboot does).  FlushMetrics and InstanceStart append a metrics
line.  SIGTERM exits 0, unless
``FAKE_VMM_IGNORE_SIGTERM=1``.  A kernel path containing "missing" is refused with
a 400.  ``--fail-start`` exits 1 at once with a message on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from fake_api import FakeApi, Recorded, fault

BEFORE_START = "The requested operation is not supported before starting the microVM."


class FakeVmm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.api = FakeApi(args.id)
        self.api.hook = self.on_request
        self.boot_args = ""
        self.flushes = 0
        self.echoed = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.unpaused = asyncio.Event()
        self.unpaused.set()

    def out(self, text: str) -> None:
        sys.stdout.buffer.write(text.encode())
        sys.stdout.buffer.flush()

    def write_metrics(self) -> None:
        line = {"utc_timestamp_ms": int(time.time() * 1000),
                "api": {"flushes": self.flushes}, "uart": {"echoed_lines": self.echoed}}
        with open(self.args.metrics_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def exit(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    async def on_request(self, rec: Recorded):
        if rec.method == "PUT" and rec.path == "/boot-source":
            if "missing" in rec.body["kernel_image_path"]:
                return fault("Cannot open the kernel image: No such file or directory (os error 2)")
            self.boot_args = rec.body.get("boot_args", "")
        if rec.method == "PUT" and rec.path == "/actions":
            action = rec.body["action_type"]
            if action == "InstanceStart":
                if self.api.state != "Not started":
                    return fault("The requested operation is not supported after starting the microVM.")
                self.api.state = "Running"
                self.write_metrics()
                asyncio.get_running_loop().call_soon(self.boot)
            elif self.api.state == "Not started":
                return fault(BEFORE_START)
            elif action == "FlushMetrics":
                self.flushes += 1
                self.write_metrics()
            elif action == "SendCtrlAltDel":
                self.out("fake-guest: ctrl-alt-del, rebooting\n")
                asyncio.get_running_loop().call_later(0.05, self.exit, 0)  # after the 204 is sent
        if rec.method == "PATCH" and rec.path == "/vm":
            if self.api.state == "Not started":
                return fault(BEFORE_START)
            paused = rec.body["state"] == "Paused"
            self.api.state = "Paused" if paused else "Running"
            (self.unpaused.clear if paused else self.unpaused.set)()
        return None

    def boot(self) -> None:
        greeting = os.environ.get("FAKE_VMM_GREETING")
        self.out(f"fake-guest: booted id={self.args.id} args={self.boot_args}\n"
                 + (f"greeting={greeting}\n" if greeting else ""))
        for token in self.boot_args.split():
            if token.startswith("exit="):
                self.exit(int(token[5:]))
            if token == "closestdout":
                os.close(1)
        asyncio.get_running_loop().create_task(self.echo())

    async def echo(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            await self.unpaused.wait()
            self.echoed += 1
            self.out("echo:" + line.decode().rstrip("\n") + "\n")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if os.environ.get("FAKE_VMM_IGNORE_SIGTERM") == "1":
            loop.add_signal_handler(signal.SIGTERM, lambda: None)
        else:
            loop.add_signal_handler(signal.SIGTERM, self.exit, 0)
        with open(self.args.log_path, "a") as log:
            log.write(f"fake-vmm: argv={sys.argv[1:]}\n")
        await self.api.start(self.args.api_sock)
        try:
            return await self.done
        finally:
            await self.api.stop()
            if os.path.exists(self.args.api_sock):
                os.unlink(self.args.api_sock)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-sock", required=True)
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--log-path", required=True)
    parser.add_argument("--metrics-path", required=True)
    parser.add_argument("--level")
    parser.add_argument("--boot-timer", action="store_true")
    parser.add_argument("--fail-start", action="store_true")
    args = parser.parse_args()
    if args.fail_start:
        print("fake-vmm: refusing to start", file=sys.stderr)
        return 1
    if os.path.lexists(args.api_sock):   # as Firecracker: a path in use is an error, never taken over
        print("Failed to open the API socket: Address in use", file=sys.stderr)
        return 1

    async def go() -> int:
        return await FakeVmm(args).run()

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
