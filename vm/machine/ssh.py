"""SSH to the guest: a fabric-style connection object with a lifecycle.

The guest is always our own QEMU VM, reached through a QEMU user-networking
port forward bound to ``127.0.0.1`` on the host, as ``root`` with the
project's ed25519 key (:func:`ensure_keypair`).  Only key authentication is
ever attempted: no password, no agent, no keys from ``~/.ssh``.

Host keys are *not* verified (:class:`_AcceptGuestHostKey`).  Each guest image
build generates fresh host keys, so pinning them would fail on every rebuild,
and there is nothing to protect: the port is a loopback-only forward into a
VM we started ourselves, carrying throw-away test data.  Do not reuse this
class for a connection that leaves the machine.

Every command is either a list of arguments, sent as :func:`shlex.join` (so
arguments are never glued together by hand), or a string that is sent as-is
and is an explicit shell snippet.  Failures become one-line
:class:`~vm.errors.HarnessError` messages naming the cause and the fix.

A command that outlives its timeout is killed in the guest, with everything
it started: each command runs with ``OVH_CMD_TAG=<random>`` in its
environment (:func:`tagged`), and on expiry a second channel kills every
process carrying that tag (:func:`kill_tagged`).  A list command is
``exec``'d by the session shell, so it keeps that shell's pid, and its parent
is sshd, as without the tag.  (``timeout(1)`` as the parent would change
both; a pty would merge stderr into stdout.)

:class:`tests.fakes.FakeConnection` has the same public API and scripted
results, for unit tests of code that drives a guest.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import secrets
import select
import shlex
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vm import errors
from vm.runner import tail

KEY_COMMENT = "ovl-volatile-harness"
#: when set, every command and connect appends one JSON line (what, seconds, the pytest
#: test it ran for) to the file it names: how the benchmark times a scenario's round trips
TIMING_VAR = "OVH_SSH_TIMING"
KEY_NAME = "id_ed25519"

Cmd = Union[Sequence[str], str]


def _oneline(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- results -----------------------------------------------------------------

def render(cmd: Cmd, env: Mapping[str, str] | None = None) -> str:
    """The exact string sent to the guest's shell for ``cmd``.

    A list is quoted with :func:`shlex.join`; a string is a shell snippet and
    is sent as-is.  ``env`` is applied with ``env K=V ...`` (sshd drops
    ``SendEnv`` variables unless ``AcceptEnv`` allows them), wrapping a
    snippet in ``sh -c`` so it still sees the variables.
    """
    if isinstance(cmd, (bytes, bytearray)):
        raise TypeError("guest commands are str or a sequence of str, not bytes")
    if not isinstance(cmd, str):
        argv = [os.fspath(a) for a in cmd]
        if not argv:
            raise ValueError("empty guest command")
    if env:
        assigns = []
        for key, value in env.items():
            if not key or "=" in key:
                raise ValueError(f"bad environment variable name {key!r}")
            assigns.append(f"{key}={value}")
        inner = ["sh", "-c", cmd] if isinstance(cmd, str) else argv
        return shlex.join(["env", *assigns, *inner])
    return cmd if isinstance(cmd, str) else shlex.join(argv)


#: environment variable that marks every process of one guest command (see the module docstring)
TAG_VAR = "OVH_CMD_TAG"
#: seconds the kill of a timed-out command may take
KILL_TIMEOUT = 20.0


def tagged(line: str, tag: str, *, simple: bool) -> str:
    """``line`` (from :func:`render`) as sent: with ``TAG_VAR=tag`` exported first.  A
    ``simple`` line (one command: a list, or anything with ``env``) is ``exec``'d, so the
    command is still the process sshd started; a snippet runs as it is after the export."""
    if not tag.isalnum():
        raise ValueError(f"bad command tag {tag!r}")
    return f"{TAG_VAR}={tag}; export {TAG_VAR}; {'exec ' if simple else ''}{line}"


def kill_tagged(tag: str) -> str:
    """Shell snippet: SIGKILL every process whose environment holds ``TAG_VAR=tag`` (one
    grep over /proc/*/environ per round, until none is left); exits 1 if some survive."""
    if not tag.isalnum():
        raise ValueError(f"bad command tag {tag!r}")
    return ("for round in 1 2 3 4 5 6 7 8 9 10; do "
            f"found=$(grep -lsxzF {TAG_VAR}={tag} /proc/[0-9]*/environ); "
            '[ -n "$found" ] || exit 0; '
            'for f in $found; do p=${f#/proc/}; kill -KILL "${p%/environ}" 2>/dev/null; done; '
            "sleep 0.2; done; exit 1")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...] | str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def command(self) -> str:
        """The command as a copy-pasteable line."""
        return self.argv if isinstance(self.argv, str) else shlex.join(self.argv)

    def check(self, fix: str = "see the command's stderr") -> "CommandResult":
        """Return self if the command succeeded, else raise :class:`GuestCommandFailed`."""
        if not self.ok:
            detail = tail(self.stderr or self.stdout, 3)
            rc = self.exit_status if self.exit_status >= 0 else "without a status (killed by a signal?)"
            raise errors.GuestCommandFailed(cmd=_oneline(self.command), rc=rc,
                                     detail=f": {_oneline(detail, 400)}" if detail else "",
                                     fix=fix)
        return self


def _argv_of(cmd: Cmd) -> tuple[str, ...] | str:
    return cmd if isinstance(cmd, str) else tuple(os.fspath(a) for a in cmd)


def record_timing(what: str, seconds: float) -> None:
    """Append ``{"what", "seconds", "test"}`` to the file ``$OVH_SSH_TIMING`` names (nothing
    when it is unset); ``test`` is pytest's current test, so a session's lines can be split
    per scenario."""
    path = os.environ.get(TIMING_VAR)
    if not path:
        return
    entry = {"what": what, "seconds": round(seconds, 6), "test": os.environ.get("PYTEST_CURRENT_TEST", "")}
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


# --- keys --------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes, mode: int, *, exclusive: bool) -> bool:
    """Write ``data`` to ``path`` via a temp file in the same directory.

    With ``exclusive`` the file is hard-linked into place and an existing file
    wins (returns False), so two concurrent runs agree on one key.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # filesystem without hard links
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_keypair(directory: Path) -> tuple[Path, str]:
    """Return ``(private key path, public key line)``, generating the key once.

    The key is ed25519 in OpenSSH private format, mode 0600, in a 0700
    directory.  Both files are written atomically, so an interrupted run never
    leaves half a key; later runs reuse the key (the guest image has the
    public half baked into ``authorized_keys``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    priv_path = directory / KEY_NAME
    pub_path = directory / f"{KEY_NAME}.pub"

    if not priv_path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        _write_atomic(priv_path, pem, 0o600, exclusive=True)

    fix = (f"delete {priv_path} and {pub_path}; a new key is generated on the next run "
           "(then rebuild the guest image so it trusts the new key)")
    try:
        key = serialization.load_ssh_private_key(priv_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise errors.BadKey(path=priv_path, reason=_oneline(exc), fix=fix) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise errors.BadKey(path=priv_path, reason=f"{type(key).__name__}, not ed25519", fix=fix)
    if (priv_path.stat().st_mode & 0o777) != 0o600:
        os.chmod(priv_path, 0o600)

    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).decode()
    line = f"{pub} {KEY_COMMENT}"
    try:
        current = pub_path.read_text()
    except OSError:
        current = None
    if current != line + "\n":
        _write_atomic(pub_path, (line + "\n").encode(), 0o644, exclusive=False)
    return priv_path, line


# --- the real connection -----------------------------------------------------

class _AcceptGuestHostKey(paramiko.MissingHostKeyPolicy):
    """Accept any host key: see the module docstring for why this is safe here."""

    def missing_host_key(self, client, hostname, key) -> None:  # noqa: D401
        return None


class GuestConnection:
    """A lazily opened SSH connection to the guest (``root``, key auth only)."""

    def __init__(self, host: str, port: int, *, user: str = "root", key_path: Path,
                 connect_timeout: float = 10.0, command_timeout: float = 300.0) -> None:
        self.host = host
        self.port = int(port)
        self.user = user
        self.key_path = Path(key_path)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        #: connection attempts of the last :meth:`wait_until_up`
        self.tries = 0

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<GuestConnection {self.user}@{self.host}:{self.port} {state}>"

    # -- lifecycle --

    @property
    def is_open(self) -> bool:
        if self._client is None:
            return False
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def __enter__(self) -> "GuestConnection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unreachable(self, reason: str, fix: str, cls=errors.SSHUnreachable):
        return cls(host=self.host, port=self.port, reason=_oneline(reason, 300), fix=fix)

    def _load_key(self) -> paramiko.PKey:
        try:
            return paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        except FileNotFoundError as exc:
            raise self._unreachable(
                f"private key {self.key_path} does not exist",
                "create it with vm.machine.ssh.ensure_keypair() and rebuild the guest image") from exc
        except (OSError, paramiko.SSHException) as exc:
            raise self._unreachable(
                f"cannot load private key {self.key_path}: {exc}",
                f"delete {self.key_path} and its .pub, re-run ensure_keypair() "
                "and rebuild the guest image") from exc

    def _translate(self, exc: BaseException) -> errors.SSHUnreachable:
        """Map a paramiko/socket failure during connect to a one-line error."""
        fwd = (f"check the VM is running and QEMU forwards "
               f"hostfwd=tcp:{self.host}:{self.port}-:22")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            inner = next(iter(exc.errors.values()), None)
            if isinstance(inner, BaseException):
                return self._translate(inner)
        if isinstance(exc, paramiko.AuthenticationException):
            return self._unreachable(
                f"authentication failed ({type(exc).__name__}: {exc}): the guest does not have "
                f"the project's key in /root/.ssh/authorized_keys",
                f"rebuild the guest image with {self.key_path}.pub in root's authorized_keys "
                "(and PermitRootLogin prohibit-password in its sshd_config)",
                cls=errors.SSHAuthFailed)
        if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
            return self._unreachable("connection refused: nothing listens on that port", fwd)
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return self._unreachable(
                f"timed out after {self.connect_timeout:g}s",
                f"the guest may still be booting (use wait_until_up) or be hung; {fwd}")
        if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
            return self._unreachable(
                f"no SSH banner ({exc}): the port accepts connections but sshd is not answering yet",
                "wait for the guest to finish booting (wait_until_up), or check the console "
                "log for an sshd failure")
        if isinstance(exc, (EOFError, ConnectionResetError, BrokenPipeError)):
            return self._unreachable(
                f"the connection was closed during the SSH handshake ({type(exc).__name__})",
                "the guest's sshd is not up yet or crashed; wait_until_up, or check the console log")
        return self._unreachable(f"{type(exc).__name__}: {exc}", fwd)

    def open(self) -> None:
        """Connect and authenticate; a no-op when already open."""
        if self.is_open:
            return
        self.close()  # drop a dead transport, if any
        pkey = self._load_key()
        started = time.monotonic()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_AcceptGuestHostKey())
        try:
            client.connect(self.host, self.port, username=self.user, pkey=pkey,
                           timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout,
                           channel_timeout=self.connect_timeout,
                           look_for_keys=False, allow_agent=False)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            raise self._translate(exc) from exc
        except BaseException:
            client.close()
            raise
        self._client = client
        record_timing("connect", time.monotonic() - started)

    def close(self) -> None:
        """Close the connection; safe when never opened, after a failed open, or twice."""
        sftp, client = self._sftp, self._client
        self._sftp = self._client = None
        if sftp is not None:
            with contextlib.suppress(Exception):
                sftp.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _dropped(self, what: str, exc: BaseException | None = None) -> errors.SSHUnreachable:
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self.close()
        return self._unreachable(
            f"the connection dropped while {what}{detail}",
            "check the guest console log for a kernel panic, oops or reboot; "
            "the next call reconnects")

    def _transport(self) -> paramiko.Transport:
        self.open()
        assert self._client is not None
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise self._dropped("opening a channel")
        return transport

    # -- commands --

    def run(self, cmd: Cmd, *, timeout: float | None = None, input: str | None = None,
            check: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        """Run ``cmd`` in the guest and return its :class:`CommandResult`.

        ``timeout`` (default ``command_timeout``) bounds the whole command; on
        expiry the channel is closed, the command and every process it started
        are killed in the guest (see :func:`kill_tagged`), and
        :class:`GuestCommandTimeout` is raised.
        """
        line = render(cmd, env)
        argv = _argv_of(cmd)
        limit = self.command_timeout if timeout is None else timeout
        tag = secrets.token_hex(8)
        started = time.monotonic()
        try:
            status, out, err = self._channel(tagged(line, tag, simple=bool(env) or not isinstance(cmd, str)),
                                             line, input, limit)
        except errors.GuestCommandTimeout:
            left = self._end_remote(tag)
            raise errors.GuestCommandTimeout(
                cmd=_oneline(line), timeout=limit,
                fix="raise the timeout, or check the guest for a hung process "
                    + ("(it was killed in the guest)" if left is None
                       else f"(it could not be killed in the guest: {_oneline(left)}; it may still run)")
            ) from None
        result = CommandResult(argv, status,
                               out.decode("utf-8", errors="replace"),
                               err.decode("utf-8", errors="replace"))
        record_timing(line, time.monotonic() - started)
        return result.check() if check else result

    def _channel(self, sent: str, line: str, input: str | None, limit: float) -> tuple[int, bytes, bytes]:
        """Run ``sent`` on a new channel (``line`` names it in errors)."""
        transport = self._transport()
        try:
            chan = transport.open_session(timeout=self.connect_timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._dropped(f"opening a channel for `{_oneline(line)}`", exc) from exc
        try:
            return self._exchange(chan, line, input, limit, transport, sent=sent)
        finally:
            chan.close()

    def _end_remote(self, tag: str) -> str | None:
        """Kill the processes of a timed-out command; None when none is left, else why not."""
        line = kill_tagged(tag)
        try:
            status, out, err = self._channel(line, "kill the timed-out command", None, KILL_TIMEOUT)
        except (errors.HarnessError, OSError, EOFError, paramiko.SSHException) as exc:
            return str(exc)
        if status != 0:
            return f"`{line}` exited {status}: {tail((err or out).decode(errors='replace'), 2)}"
        return None

    def _exchange(self, chan: paramiko.Channel, line: str, input: str | None,
                  limit: float, transport: paramiko.Transport, sent: str | None = None
                  ) -> tuple[int, bytes, bytes]:
        deadline = time.monotonic() + limit
        pending = (input or "").encode()
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            chan.exec_command(line if sent is None else sent)
            if not pending:
                chan.shutdown_write()
            while True:
                if pending and (chan.closed or chan.exit_status_ready()):
                    pending = b""  # the command exited without reading all its input
                if pending and chan.send_ready():
                    try:
                        sent = chan.send(pending[:32768])
                    except OSError:
                        if not transport.is_active():
                            raise
                        sent = len(pending)  # the remote closed the channel meanwhile
                    pending = pending[sent:]
                    if not pending and not chan.closed:
                        chan.shutdown_write()
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                finished = chan.closed or (chan.eof_received and chan.exit_status_ready())
                if finished and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not transport.is_active():
                    raise self._dropped(f"running `{_oneline(line)}`")
                if time.monotonic() >= deadline:
                    raise errors.GuestCommandTimeout(
                        cmd=_oneline(line), timeout=limit,
                        fix="raise the timeout, or check the guest for a hung process")
                wait = min(0.1, max(0.0, deadline - time.monotonic()))
                if pending:
                    wait = min(wait, 0.01)
                if chan.eof_received:
                    # the pipe behind fileno() stays readable after EOF: wait for the status
                    chan.status_event.wait(wait)
                else:
                    select.select([chan], [], [], wait)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._dropped(f"running `{_oneline(line)}`", exc) from exc
        status = chan.recv_exit_status()
        if status == -1 and not transport.is_active():
            raise self._dropped(f"running `{_oneline(line)}`")
        return status, b"".join(out), b"".join(err)

    # -- files --

    def _sftp_client(self) -> paramiko.SFTPClient | None:
        """The cached SFTP client, or None when the guest has no SFTP subsystem."""
        if self._sftp is not None and self.is_open:
            return self._sftp
        self._transport()
        assert self._client is not None
        try:
            self._sftp = self._client.open_sftp()
        except paramiko.SSHException:
            if not self.is_open:
                raise self._dropped("opening SFTP")
            return None  # no `Subsystem sftp` in the guest's sshd_config
        except (OSError, EOFError) as exc:
            raise self._dropped("opening SFTP", exc) from exc
        return self._sftp

    def put_text(self, remote_path: str, text: str, mode: int = 0o644) -> None:
        """Write ``text`` (UTF-8) to ``remote_path`` atomically (temp file + rename)."""
        self.put_bytes(remote_path, text.encode("utf-8"), mode)

    def put_bytes(self, remote_path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``remote_path`` atomically (temp file + rename); a guest without
        SFTP gets it through the shell, base64-encoded."""
        tmp = f"{remote_path}.tmp-ovh{os.getpid()}"
        sftp = self._sftp_client()
        if sftp is None:  # fall back to the shell
            script = 'base64 -d > "$1" && chmod "$2" "$1" && mv -f "$1" "$3"'
            self.run(["sh", "-c", script, "put_bytes", tmp, f"{mode:o}", remote_path],
                     input=base64.b64encode(data).decode("ascii"), check=True)
            return
        try:
            with sftp.open(tmp, "wb") as fh:
                fh.write(data)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, remote_path)
        except (EOFError, paramiko.SSHException) as exc:
            raise self._dropped(f"writing {remote_path}", exc) from exc
        except OSError:
            if not self.is_open:
                raise self._dropped(f"writing {remote_path}")
            with contextlib.suppress(Exception):
                sftp.remove(tmp)
            raise

    def get_text(self, remote_path: str) -> str:
        """Read ``remote_path`` as UTF-8 (FileNotFoundError if it does not exist)."""
        sftp = self._sftp_client()
        if sftp is None:
            res = self.run(["cat", "--", remote_path])
            if not res.ok and "No such file" in res.stderr:
                raise FileNotFoundError(errno.ENOENT, "no such file in the guest", remote_path)
            return res.check().stdout
        try:
            with sftp.open(remote_path, "rb") as fh:
                data = fh.read()
        except (EOFError, paramiko.SSHException) as exc:
            raise self._dropped(f"reading {remote_path}", exc) from exc
        except OSError:
            if not self.is_open:
                raise self._dropped(f"reading {remote_path}")
            raise
        return data.decode("utf-8", errors="replace")

    # -- boot --

    def wait_until_up(self, deadline_s: float, *, abort: Callable[[], str | None] | None = None,
                      interval: float = 1.0) -> float:
        """Retry connecting until ``true`` runs in the guest; return seconds waited.

        ``abort()`` is called before each try; a string it returns (e.g.
        ``"kernel panic: ..."``) raises :class:`SSHUnreachable` at once.  An
        authentication failure is raised at once too: retrying cannot fix it.
        """
        start = time.monotonic()
        end = start + deadline_s
        last: BaseException | None = None
        saved = self.connect_timeout
        self.tries = 0
        try:
            while True:
                self.tries += 1
                if abort is not None:
                    reason = abort()
                    if reason:
                        self.close()
                        raise self._unreachable(
                            f"gave up waiting for sshd: {reason}",
                            "see the guest console log; the kernel did not boot to userspace")
                remaining = end - time.monotonic()
                self.connect_timeout = max(0.5, min(saved, remaining))
                try:
                    self.open()
                    self.run("true", timeout=max(1.0, remaining), check=True)
                    return time.monotonic() - start
                except errors.SSHAuthFailed:
                    raise
                except (errors.HarnessError, OSError, EOFError, paramiko.SSHException) as exc:
                    last = exc
                    self.close()
                now = time.monotonic()
                if now >= end:
                    break
                time.sleep(min(interval, end - now))
        finally:
            self.connect_timeout = saved
        raise self._unreachable(
            f"sshd did not answer within {deadline_s:g}s; last error: {last}",
            "check the guest console log (did it boot? is sshd enabled?) or raise the deadline")
