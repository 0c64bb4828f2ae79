"""vm.machine.ssh against a real sshd on 127.0.0.1 (started per module), plus FakeConnection."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from tests.fakes import FakeConnection
from vm import errors
from vm.machine.ssh import CommandResult, GuestConnection, ensure_keypair, render
from vm.runner import pid_alive, proc_stat

pytestmark = pytest.mark.unit

SSHD = Path("/usr/sbin/sshd")


# --- a real sshd -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(entry)
        if fields is None:
            continue
        ppid = int(fields[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class SshdFactory:
    """Starts `sshd -D -e` instances; `stop_all` kills them and their session children."""

    def __init__(self, workdir: Path, host_key: Path, authorized_keys: Path) -> None:
        self.workdir = workdir
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def start(self, port: int | None = None, *, wait: bool = True) -> int:
        port = port or _free_port()
        cfg = self.workdir / f"sshd_config.{port}"
        cfg.write_text(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "PidFile none\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "Subsystem sftp internal-sftp\n")
        log = open(self.workdir / f"sshd.{port}.log", "wb")
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        with self.lock:
            self.procs.append(proc)
        if wait:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    text = (self.workdir / f"sshd.{port}.log").read_text()
                    pytest.fail(f"sshd exited {proc.returncode}: {text.strip()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    return port
                except OSError:
                    time.sleep(0.05)
            pytest.fail(f"sshd did not listen on {port} within 10s")
        return port

    def stop_all(self) -> None:
        with self.lock:
            procs, self.procs = self.procs, []
        pids: list[int] = []
        for proc in procs:
            # session children setsid() and would outlive the listener: collect them first
            pids += _descendants(proc.pid)
            if proc.poll() is None:
                proc.terminate()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        left = [p for p in pids + [pr.pid for pr in procs] if pid_alive(p)]
        assert not left, f"sshd processes left running: {left}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    client_key, client_pub = ensure_keypair(base / "client")
    host_key, _ = ensure_keypair(base / "host")
    authorized = base / "authorized_keys"
    authorized.write_text(client_pub + "\n")
    return client_key, host_key, authorized


@pytest.fixture(scope="module")
def sshd_factory(keys, tmp_path_factory, missing_input):
    if not SSHD.exists():
        missing_input(str(SSHD), "apt-get install openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    _, host_key, authorized = keys
    factory = SshdFactory(tmp_path_factory.mktemp("sshd"), host_key, authorized)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def sshd_port(sshd_factory) -> int:
    return sshd_factory.start()


@pytest.fixture
def conn(sshd_port, keys):
    c = GuestConnection("127.0.0.1", sshd_port, key_path=keys[0], connect_timeout=5,
                        command_timeout=20)
    yield c
    c.close()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    assert "; fix: " in text
    return text


# --- ensure_keypair ----------------------------------------------------------

def test_ensure_keypair_creates_once_and_reuses(tmp_path):
    key_dir = tmp_path / "state" / "ssh"
    path, pub = ensure_keypair(key_dir)
    assert path == key_dir / "id_ed25519"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert pub.startswith("ssh-ed25519 AAAA") and pub.endswith(" ovl-volatile-harness")
    assert (key_dir / "id_ed25519.pub").read_text() == pub + "\n"
    assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert [p.name for p in key_dir.iterdir() if p.name.endswith(".tmp")] == []
    # paramiko (what GuestConnection uses) can load it
    assert paramiko.Ed25519Key.from_private_key_file(str(path)).get_name() == "ssh-ed25519"

    before = path.read_bytes()
    (key_dir / "id_ed25519.pub").unlink()  # a lost .pub is re-derived, not a new key
    path2, pub2 = ensure_keypair(key_dir)
    assert (path2, pub2) == (path, pub)
    assert path.read_bytes() == before
    assert (key_dir / "id_ed25519.pub").read_text() == pub + "\n"


def test_ensure_keypair_rejects_garbage(tmp_path):
    (tmp_path / "id_ed25519").write_text("half a key")
    with pytest.raises(errors.UserError, match="id_ed25519 is unusable") as info:
        ensure_keypair(tmp_path)
    _one_line(info.value)


# --- commands over a real sshd -----------------------------------------------

@pytest.mark.sshd
def test_list_command_is_quoted_exactly(conn):
    awkward = ["a b", "it's", '"dq"', "$HOME", "a;b", "*", "`id`", "back\\slash", ""]
    res = conn.run(["printf", "%s\\n", *awkward])
    assert res.ok and res.exit_status == 0
    assert res.stdout == "".join(a + "\n" for a in awkward)
    assert res.argv == ("printf", "%s\\n", *awkward)


@pytest.mark.sshd
def test_exit_status_stderr_and_input(conn):
    assert conn.run(["sh", "-c", "exit 7"]).exit_status == 7
    res = conn.run("echo out; echo oops >&2")  # a str is a shell snippet
    assert (res.stdout, res.stderr) == ("out\n", "oops\n")
    assert conn.run(["cat"], input="line 1\nline 2\n").stdout == "line 1\nline 2\n"
    big = "x" * 999 + "\n"
    assert conn.run(["cat"], input=big * 2000).stdout == big * 2000  # > the SSH window
    assert conn.run(["head", "-c", "3"], input=big * 5000).stdout == "xxx"  # input not all read
    assert conn.run("echo \"$FOO\"", env={"FOO": "a b;c"}).stdout == "a b;c\n"


@pytest.mark.sshd
def test_lifecycle(conn, sshd_port, keys):
    assert not conn.is_open
    assert conn.run(["true"]).ok
    assert conn.is_open
    conn.close()
    conn.close()
    assert not conn.is_open
    assert conn.run(["echo", "again"]).stdout == "again\n"  # re-opens
    conn.open()
    conn.open()  # idempotent
    with GuestConnection("127.0.0.1", sshd_port, key_path=keys[0]) as c2:
        assert c2.run(["true"]).ok and c2.is_open
    assert not c2.is_open


@pytest.mark.sshd
def test_check_raises_one_line(conn):
    res = conn.run(["sh", "-c", "echo first >&2; echo 'last line' >&2; exit 3"])
    assert not res.ok
    with pytest.raises(errors.GuestCommandFailed) as info:
        res.check()
    text = _one_line(info.value)
    assert "exited 3" in text and "last line" in text and "sh -c" in text
    assert isinstance(info.value, errors.InfraError)
    with pytest.raises(errors.GuestCommandFailed):
        conn.run(["false"], check=True)
    assert conn.run(["true"], check=True).ok


@pytest.mark.sshd
def test_timeout_closes_channel_fast(conn, tmp_path):
    # the remote process outlives its closed channel (no pty to hang up): record
    # its pid so the test can end it (the guest is this host here)
    pidfile = tmp_path / "sleep.pid"
    t0 = time.monotonic()
    try:
        with pytest.raises(errors.GuestCommandTimeout) as info:
            conn.run(["sh", "-c", 'echo $$ > "$1"; exec sleep 30', "sh", str(pidfile)],
                     timeout=1)
        assert time.monotonic() - t0 < 3
        assert "sleep 30" in _one_line(info.value) and "within 1s" in str(info.value)
        assert conn.run(["echo", "still usable"]).stdout == "still usable\n"
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.sshd
def test_dropped_connection_mid_command(conn):
    # kill the sshd session process serving this connection
    with pytest.raises(errors.SSHUnreachable, match="dropped while running") as info:
        conn.run(["sh", "-c", "kill -9 $PPID; sleep 5"], timeout=10)
    _one_line(info.value)
    assert not conn.is_open
    assert conn.run(["true"]).ok  # reconnects


@pytest.mark.sshd
def test_wrong_key_is_auth_failure(sshd_port, tmp_path):
    other, _ = ensure_keypair(tmp_path / "other")
    c = GuestConnection("127.0.0.1", sshd_port, key_path=other, connect_timeout=5)
    with pytest.raises(errors.SSHAuthFailed) as info:
        c.run(["true"])
    text = _one_line(info.value)
    assert "authorized_keys" in text and f"127.0.0.1:{sshd_port}" in text
    assert not c.is_open
    c.close()
    c.close()
    # never worth retrying: wait_until_up raises at once
    t0 = time.monotonic()
    with pytest.raises(errors.SSHAuthFailed):
        c.wait_until_up(30)
    assert time.monotonic() - t0 < 5


def test_missing_key_file(tmp_path):
    c = GuestConnection("127.0.0.1", 1, key_path=tmp_path / "nope")
    with pytest.raises(errors.SSHUnreachable, match="does not exist") as info:
        c.open()
    assert "ensure_keypair" in _one_line(info.value)


def test_nothing_listening_fails_fast(keys):
    port = _free_port()
    c = GuestConnection("127.0.0.1", port, key_path=keys[0], connect_timeout=1)
    t0 = time.monotonic()
    with pytest.raises(errors.SSHUnreachable) as info:
        c.open()
    assert time.monotonic() - t0 < 2
    text = _one_line(info.value)
    assert "refused" in text and f"127.0.0.1:{port}" in text and "hostfwd" in text
    c.close()


def test_handshake_eof_is_unreachable(keys):
    # like QEMU's forward before the guest's sshd listens: accept, then hang up
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def hang_up():
        for _ in range(1):
            s, _ = srv.accept()
            s.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    c = GuestConnection("127.0.0.1", port, key_path=keys[0], connect_timeout=2)
    try:
        with pytest.raises(errors.SSHUnreachable) as info:
            c.open()
        _one_line(info.value)
    finally:
        t.join(5)
        srv.close()


@pytest.mark.sshd
def test_wait_until_up_for_late_sshd(sshd_factory, keys):
    port = _free_port()
    timer = threading.Timer(1.5, sshd_factory.start, args=(port,), kwargs={"wait": False})
    timer.start()
    c = GuestConnection("127.0.0.1", port, key_path=keys[0], connect_timeout=2)
    try:
        waited = c.wait_until_up(10, interval=0.2)
        assert 1.2 < waited < 8
        assert c.is_open
        assert c.run(["echo", "up"]).stdout == "up\n"
    finally:
        timer.join()
        c.close()


def test_wait_until_up_abort_raises_at_once(keys):
    c = GuestConnection("127.0.0.1", _free_port(), key_path=keys[0], connect_timeout=1)
    calls = []

    def abort():
        calls.append(1)
        return "kernel panic: VFS: Unable to mount root fs" if len(calls) >= 3 else None

    t0 = time.monotonic()
    with pytest.raises(errors.SSHUnreachable, match="kernel panic: VFS") as info:
        c.wait_until_up(60, abort=abort, interval=0.1)
    assert time.monotonic() - t0 < 2
    assert len(calls) == 3
    _one_line(info.value)


def test_wait_until_up_deadline(keys):
    port = _free_port()
    c = GuestConnection("127.0.0.1", port, key_path=keys[0], connect_timeout=5)
    t0 = time.monotonic()
    with pytest.raises(errors.SSHUnreachable) as info:
        c.wait_until_up(1.0, interval=0.2)
    assert time.monotonic() - t0 < 2.5
    text = _one_line(info.value)
    assert f"127.0.0.1:{port}" in text and "within 1s" in text and "refused" in text
    assert c.connect_timeout == 5


# --- files -------------------------------------------------------------------

@pytest.mark.sshd
def test_put_get_text_round_trip(conn, tmp_path):
    target = tmp_path / "guest file.txt"
    text = "héllo\nwörld ✓\n" * 100
    conn.put_text(str(target), text, mode=0o600)
    assert target.read_text(encoding="utf-8") == text
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert conn.get_text(str(target)) == text
    conn.put_text(str(target), "replaced\n")
    assert conn.get_text(str(target)) == "replaced\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest file.txt"]  # no temp left
    with pytest.raises(FileNotFoundError):
        conn.get_text(str(tmp_path / "missing"))


@pytest.mark.sshd
def test_put_get_text_without_sftp(conn, tmp_path, monkeypatch):
    conn.open()

    def no_sftp():
        raise paramiko.SSHException("Channel closed.")

    monkeypatch.setattr(conn._client, "open_sftp", no_sftp)
    target = tmp_path / "f.txt"
    conn.put_text(str(target), "via shell ✓\n", mode=0o640)
    assert target.read_text(encoding="utf-8") == "via shell ✓\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert conn.get_text(str(target)) == "via shell ✓\n"
    with pytest.raises(FileNotFoundError):
        conn.get_text(str(tmp_path / "missing"))


@pytest.mark.sshd
@pytest.mark.parametrize("sftp", [True, False], ids=["sftp", "shell"])
def test_put_bytes_binary_round_trip(conn, tmp_path, monkeypatch, sftp):
    """A module (binary, NUL bytes, every byte value) arrives byte for byte, with its mode."""
    conn.open()
    if not sftp:
        def no_sftp():
            raise paramiko.SSHException("Channel closed.")
        monkeypatch.setattr(conn._client, "open_sftp", no_sftp)
    data = bytes(range(256)) * 300 + b"\x7fELF\0\0"
    target = tmp_path / "overlay.ko"
    conn.put_bytes(str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.ko"]  # no temp left


# --- render / FakeConnection -------------------------------------------------

def test_render():
    assert render(["echo", "a b", "$X"]) == "echo 'a b' '$X'"
    assert render("echo $X; true") == "echo $X; true"
    assert render(["id"], env={"A": "1 2"}) == "env 'A=1 2' id"
    assert render("echo $A", env={"A": "1"}) == "env A=1 sh -c 'echo $A'"
    with pytest.raises(ValueError):
        render([])


def test_fake_connection_records_and_scripts():
    fake = FakeConnection({"uname": CommandResult("uname", 0, "6.12.0\n", "")})
    fake.expect("mount -t overlay", exit_status=32, stderr="mount: wrong fs type\n")
    fake.expect("mount", stdout="never reached for overlay\n")
    fake.responses["cat /proc/x"] = lambda cmd: f"saw {cmd}"

    assert not fake.is_open
    assert fake.run(["uname", "-r"]).stdout == "6.12.0\n"
    assert fake.is_open
    res = fake.run(["mount", "-t", "overlay", "overlay", "/mnt"])
    assert (res.exit_status, res.argv) == (32, ("mount", "-t", "overlay", "overlay", "/mnt"))
    with pytest.raises(errors.GuestCommandFailed, match="wrong fs type"):
        res.check()
    assert fake.run(["mount"]).stdout == "never reached for overlay\n"
    assert fake.run("cat /proc/x").stdout == "saw cat /proc/x"
    assert fake.run(["ls", "/a b"]) == CommandResult(("ls", "/a b"), 0, "", "")
    assert fake.calls == ["uname -r", "mount -t overlay overlay /mnt", "mount",
                          "cat /proc/x", "ls '/a b'"]

    fake.put_text("/etc/x", "data", mode=0o600)
    assert fake.get_text("/etc/x") == "data" and fake.modes["/etc/x"] == 0o600
    with pytest.raises(FileNotFoundError):
        fake.get_text("/nope")
    with fake:
        pass
    assert not fake.is_open
    assert fake.wait_until_up(5) == 0.0
    with pytest.raises(errors.SSHUnreachable, match="kernel panic"):
        fake.wait_until_up(5, abort=lambda: "kernel panic")


def test_fake_connection_strict():
    fake = FakeConnection(strict=True)
    fake.expect("true")
    assert fake.run(["true"]).ok
    with pytest.raises(AssertionError, match="unexpected command 'rm -rf /'"):
        fake.run(["rm", "-rf", "/"])
    with pytest.raises(errors.GuestCommandFailed):
        FakeConnection({"x": lambda cmd: 4}).run(["x"], check=True)
