"""The fork server and launcher as processes, with probe children instead of VMMs (no KVM needed).

Each test starts the real server (``probe.py``: real ``ForkServer``, real child
set-up, an entry point that reports what the child inherited) and launches
through the real ``asyncvmm`` command line with ``ASYNCVMM_FORKSERVER`` set.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncvmm.forkserver import ENV_VAR, protocol
from asyncvmm.forkserver.server import ForkServerError, bind_private_socket
from tests.conftest import process_alive, require

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 20


def _wait_gone(pid: int, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Zygote:
    def __init__(self, tmp_path: Path, waiter: str | None = None, **popen) -> None:
        self.path = str(tmp_path / "zygote.sock")
        self.waiter = waiter
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.unit.forkserver.probe", self.path,
                                      *([waiter] if waiter else [])],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
        line = self.proc.stdout.readline()
        assert line.startswith(b"ready"), line + self.proc.stderr.read()
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._pidfds: list[int] = []        # the reported children, for a close() that cannot hit a reused pid
        self._log = b""

    def launch(self, *argv: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        env = dict(os.environ if env is None else env, **{ENV_VAR: self.path})
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([sys.executable, "-m", "asyncvmm.cli", *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

    def report(self, proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else b"no report"
        state = json.loads(line)
        try:
            self._pidfds.append(os.pidfd_open(state["pid"]))
        except ProcessLookupError:
            pass                            # gone already: nothing to clean up
        return state

    def log(self) -> str:
        """What the server has written to its stderr so far (for failure messages)."""
        try:
            while chunk := self.proc.stderr.read(65536):
                self._log += chunk
        except (BlockingIOError, ValueError):
            pass
        return self._log.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pidfd in self._pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(pidfd)


@pytest.fixture(scope="session")
def native_waiter(tmp_path_factory):
    from asyncvmm.forkserver.native import build_waiter
    path = build_waiter(tmp_path_factory.mktemp("waiter"))
    require(path is not None, "no C compiler (cc) to build the native waiter")
    return path


@pytest.fixture(params=["python-waiter", "native-waiter"])
def zygote(request, tmp_path):
    """The probe server, once with launchers waiting in waiter.py, once in the native waiter."""
    waiter = request.getfixturevalue("native_waiter") if request.param == "native-waiter" else None
    z = Zygote(tmp_path, waiter)
    yield z
    z.close()


def _finish(proc: subprocess.Popen, stdin: bytes | None = None) -> tuple[int, str, str]:
    out, err = proc.communicate(stdin, timeout=TIMEOUT)
    return proc.returncode, out.decode(), err.decode()


def test_exit_code_and_stdio_pass_through(zygote):
    proc = zygote.launch("echo", stdin=subprocess.PIPE)
    code, out, err = _finish(proc, b"hello\n")
    lines = out.splitlines()
    assert code == 0, err
    assert json.loads(lines[0])["argv"] == ["echo"]
    assert lines[1] == "echo:hello"
    assert err == "to-stderr\n"
    code, _, err = _finish(zygote.launch("exit", "7"))
    assert code == 7, err


def test_the_child_takes_the_launchers_cwd_env_umask_and_rlimits(zygote, tmp_path):
    import resource

    def limits():
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    env = {"PATH": os.environ.get("PATH", ""), "PROBE_VAR": "x\u00e9y", "PYTHONPATH": str(REPO)}
    proc = zygote.launch("exit", "0", env=env, cwd=tmp_path, preexec_fn=limits)
    state = zygote.report(proc)
    assert _finish(proc)[0] == 0
    assert state["cwd"] == str(tmp_path)
    assert state["env"]["PROBE_VAR"] == "x\u00e9y" and "HOME" not in state["env"] or "HOME" in env
    assert state["env"][ENV_VAR] == zygote.path          # its environment, as the launcher had it
    assert state["umask"] == 0o027
    assert state["nofile"][0] == 512
    assert state["sys_argv"] == ["asyncvmm", "exit", "0"]


def test_the_child_is_its_own_session_with_fresh_signal_state(zygote):
    proc = zygote.launch("exit", "0")
    state = zygote.report(proc)
    assert _finish(proc)[0] == 0
    assert state["sid"] == state["pid"] == state["pgid"]
    assert state["ppid"] == zygote.proc.pid
    # The server's SIGCHLD/SIGTERM handlers are gone; a fresh interpreter's are back.
    assert state["sigterm"] == "SIG_DFL" and state["sigchld"] == "SIG_DFL"
    # A fresh interpreter's SIGINT: Python's handler, unless it was started with SIGINT ignored (a
    # background job of a shell without job control), as this test process was then too.
    fresh = subprocess.run([sys.executable, "-c", "import signal; h = signal.getsignal(signal.SIGINT); "
                            "print('SIG_IGN' if h is signal.SIG_IGN else h.__name__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert fresh in ("default_int_handler", "SIG_IGN")
    assert state["sigint"] == fresh
    assert state["sigmask"] == []


def test_two_children_share_no_descriptors_and_no_secrets(zygote):
    a = zygote.launch("sleep", "30", stdin=subprocess.PIPE)
    b = zygote.launch("sleep", "30", stdin=subprocess.PIPE)
    try:
        sa, sb = zygote.report(a), zygote.report(b)
        # stdio (the launcher's, handed over) and the child's own connection: nothing else.
        assert sorted(sa["fds"], key=int) == ["0", "1", "2", "3"]
        assert sorted(sb["fds"], key=int) == ["0", "1", "2", "3"]
        assert sa["fds"]["3"] != sb["fds"]["3"]
        for name in ("1", "2"):                               # each has its own launcher's pipes
            assert sa["fds"][name] != sb["fds"][name]
        # No open file in common at all (by device and inode).
        assert {tuple(v) for v in sa["fds"].values()} & {tuple(v) for v in sb["fds"].values()} == set()
        # Secrets: every child draws its own MMDS token keys, also for an authority the server
        # made before forking (a token the server issued is worthless in a child).
        assert sa["fresh_key"] != sb["fresh_key"]
        assert sa["zygote_key"] != sb["zygote_key"]
        assert not sa["zygote_token_valid_here"] and not sb["zygote_token_valid_here"]
        assert sa["random"] != sb["random"]
    finally:
        a.kill(), b.kill()
        a.communicate(), b.communicate()


def test_sigterm_to_the_launcher_reaches_the_child(zygote):
    proc = zygote.launch("term-exits", "42")
    zygote.report(proc)
    assert proc.stdout.readline() == b"waiting\n"
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc)[0] == 42


def test_a_child_killed_by_a_signal_kills_its_launcher_alike(zygote):
    proc = zygote.launch("kill-self", str(int(signal.SIGKILL)))
    code, _, err = _finish(proc)
    assert code == -signal.SIGKILL, err


def test_sigkill_of_the_launcher_ends_its_child(zygote):
    proc = zygote.launch("sleep", "60")
    state = zygote.report(proc)
    assert proc.stdout.readline() == b"sleeping\n"
    proc.kill()
    proc.wait()
    assert _wait_gone(state["pid"]), "the child outlived its launcher"
    # The server lives on and serves the next request.
    assert _finish(zygote.launch("exit", "3"))[0] == 3


def test_sigkill_of_the_server_leaves_children_running_and_their_status_arrives(zygote):
    proc = zygote.launch("sleep", "1.5")
    state = zygote.report(proc)
    assert proc.stdout.readline() == b"sleeping\n"
    zygote.proc.kill()
    zygote.proc.wait()
    assert process_alive(state["pid"])
    assert _finish(proc)[0] == 0            # the child reports its own exit when the server is gone


def _raw_request(path: str, data: bytes, fds: list[int]) -> tuple[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        socket.send_fds(s, [data], fds) if fds else s.send(data)
        reply = s.recv(protocol.MAX_MESSAGE)
        assert s.recv(10) == b""            # and the server hung up
    return protocol.parse_reply(reply)


def test_bad_requests_are_answered_and_the_server_lives_on(zygote):
    stdio = [0, 1, 2]
    good = protocol.make_request(["exit", "5"], "/", {}, {}, 0o22)
    cases = [
        (b"\x00garbage\xff", stdio, "not a JSON message"),
        (b"[" * 100_000, stdio, "nested too deeply"),
        (b'{"version": 1}', stdio, "argv"),
        (good, [], "exactly 3 descriptors"),
        (good, [0, 1, 2, 0], "exactly 3 descriptors"),
        (b"x" * (protocol.MAX_MESSAGE + 100), stdio, "byte limit"),
    ]
    for data, fds, why in cases:
        kind, text = _raw_request(zygote.path, data, fds)
        assert kind == "error" and why in text, (why, text)
    # Connect and leave at once: nothing to answer, nothing breaks.
    socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(zygote.path)
    assert zygote.proc.poll() is None
    # No descriptor received with a refused request stays open in the server.
    time.sleep(0.2)
    fds_before = len(os.listdir(f"/proc/{zygote.proc.pid}/fd"))
    _raw_request(zygote.path, b"garbage", stdio)
    time.sleep(0.2)
    assert len(os.listdir(f"/proc/{zygote.proc.pid}/fd")) == fds_before
    code, _, err = _finish(zygote.launch("exit", "5"))
    assert code == 5, f"launcher stderr: {err!r}; server log: {zygote.log()!r}"


def test_another_uid_is_refused(tmp_path):
    require(os.geteuid() == 0, "needs root to connect as another uid")
    import tempfile
    open_dir = Path(tempfile.mkdtemp(prefix="h8-zygote-"))    # pytest's tmp dirs are 0700
    open_dir.chmod(0o755)
    zygote = Zygote(open_dir)
    try:
        assert stat.S_IMODE(os.stat(zygote.path).st_mode) == 0o600
        os.chmod(zygote.path, 0o666)          # let the other uid reach the uid check itself
        client = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.settimeout(10)\n"
            f"s.connect({zygote.path!r})\n"
            "try:\n"
            "    socket.send_fds(s, [b'{}'], [0, 1, 2])\n"
            "except BrokenPipeError:\n"
            "    pass  # refused before we sent: the answer is already waiting\n"
            "sys.stdout.write(s.recv(65536).decode())\n")
        # The venv's interpreter may sit under a directory the other uid cannot enter.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        python = next((p for p in (sys.executable, "/usr/bin/python3")
                       if subprocess.run([*nobody, p, "-c", ""], capture_output=True).returncode == 0), None)
        require(python is not None, "no Python interpreter that uid 65534 may run")
        out = subprocess.run([*nobody, python, "-I", "-c", client], capture_output=True,
                             timeout=TIMEOUT, cwd="/")
        assert out.stdout, out.stderr
        kind, text = protocol.parse_reply(out.stdout)
        assert kind == "error" and "uid 65534 may not use" in text
        assert _finish(zygote.launch("exit", "0"))[0] == 0
    finally:
        zygote.close()
        for f in open_dir.iterdir():
            f.unlink()
        open_dir.rmdir()


def test_a_launcher_without_a_server_fails_clearly(tmp_path):
    env = dict(os.environ, **{ENV_VAR: str(tmp_path / "nothing.sock")})
    out = subprocess.run([sys.executable, "-m", "asyncvmm.cli", "--api-sock", str(tmp_path / "a.sock")],
                         env=env, capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 1
    assert b"fork server" in out.stderr and b"cannot reach it" in out.stderr
    assert not (tmp_path / "a.sock").exists()


def test_the_socket_is_private_and_a_live_one_is_not_taken_over(tmp_path):
    path = str(tmp_path / "z.sock")
    first = bind_private_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ForkServerError, match="another fork server"):
            bind_private_socket(path)
    finally:
        first.close()
    second = bind_private_socket(path)       # stale now: replaced
    second.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(ForkServerError, match="not a socket"):
        bind_private_socket(str(tmp_path / "file"))


def test_the_launcher_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules)\n"
            "from asyncvmm.forkserver import launcher\n"
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=TIMEOUT)
    ours = {m for m in out.stdout.split() if m.split(".")[0] == "asyncvmm"}
    assert ours == {"asyncvmm", "asyncvmm.forkserver", "asyncvmm.forkserver.launcher",
                    "asyncvmm.forkserver.protocol"}
    stdlib = set(sys.stdlib_module_names)
    third_party = {m for m in out.stdout.split() if m.split(".")[0] not in stdlib | {"asyncvmm"}}
    assert not third_party, third_party


def test_the_waiter_imports_only_builtin_modules():
    import asyncvmm.forkserver as pkg
    tree = ast.parse(Path(pkg.__file__).with_name("waiter.py").read_text())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= {"os", "sys", "_signal", "_json"}, names


def test_direct_spawn_without_a_launcher(zygote):
    from asyncvmm.forkserver.client import SpawnError, spawn

    r, w = os.pipe()
    try:
        vmm = spawn(zygote.path, ["exit", "9"], stdout=w)
        assert vmm.wait() == 9
        state = json.loads(os.read(r, 1 << 16).split(b"\n")[0])
        assert state["pid"] == vmm.pid and state["argv"] == ["exit", "9"]

        vmm = spawn(zygote.path, ["term-exits", "43"], stdout=w)
        seen = b""
        while b"waiting" not in seen:                    # its SIGTERM handler is in place
            seen += os.read(r, 1 << 16)
        vmm.send_signal(signal.SIGTERM)
        assert vmm.wait() == 43

        vmm = spawn(zygote.path, ["sleep", "60"], stdout=w)
        pid = vmm.pid
        vmm.close()                                      # letting go ends it, as a launcher's death does
        assert _wait_gone(pid)
    finally:
        os.close(r), os.close(w)
    with pytest.raises(SpawnError, match="cannot be|No such file"):
        spawn(zygote.path + ".missing", ["exit", "0"])


async def test_direct_spawn_waits_in_asyncio(zygote):
    from asyncvmm.forkserver.client import spawn

    null = os.open(os.devnull, os.O_WRONLY)
    try:
        vmm = spawn(zygote.path, ["kill-self", str(int(signal.SIGKILL))], stdout=null)
    finally:
        os.close(null)
    assert await vmm.wait_async() == -signal.SIGKILL


def test_many_microvms_ending_at_once_leave_the_server_serving(zygote):
    # Children exit, launchers (told by the child itself) hang up, and the server reaps, all in
    # the same event batches: a connection closed by a reap earlier in a batch must not be
    # served later in it.  Then the same with the launchers killed first.
    procs = [zygote.launch("term-exits", "0") for _ in range(60)]
    for p in procs:
        zygote.report(p)
        assert p.stdout.readline() == b"waiting\n"
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [_finish(p)[0] for p in procs] == [0] * len(procs)
    procs = [zygote.launch("sleep", "60") for _ in range(20)]
    pids = [zygote.report(p)["pid"] for p in procs]
    for p in procs:
        p.kill()
    for p in procs:
        p.communicate()
    for pid in pids:
        assert _wait_gone(pid)
    assert zygote.proc.poll() is None, zygote.proc.stderr.read()
    assert _finish(zygote.launch("exit", "4"))[0] == 4


def test_the_server_takes_its_hard_descriptor_limit_and_children_take_the_launchers(tmp_path):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    require(hard > 256, "the hard RLIMIT_NOFILE is too low to tell soft from hard")
    zygote = Zygote(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        with open(f"/proc/{zygote.proc.pid}/limits") as f:
            line = next(li for li in f if li.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]   # one descriptor per running child
        proc = zygote.launch("exit", "0")
        state = zygote.report(proc)
        assert _finish(proc)[0] == 0
        assert state["nofile"] == list(resource.getrlimit(resource.RLIMIT_NOFILE))
    finally:
        zygote.close()


def test_the_launcher_waits_in_the_waiter_it_was_given(zygote):
    proc = zygote.launch("sleep", "30")
    try:
        zygote.report(proc)
        assert proc.stdout.readline() == b"sleeping\n"
        deadline = time.monotonic() + TIMEOUT
        while True:                                       # the exec follows the pid reply
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode()
            if argv0 == zygote.waiter or "waiter.py" in open(f"/proc/{proc.pid}/cmdline").read():
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if zygote.waiter:
            assert argv0 == zygote.waiter
        else:
            assert "waiter.py" in open(f"/proc/{proc.pid}/cmdline").read()
    finally:
        proc.kill()
        proc.communicate()

