"""Test doubles shared by the unit tests.

:class:`FakeConnection` stands in for :class:`vm.machine.ssh.GuestConnection`
(same public API, scripted results): code that drives a guest is unit-tested
against it without a VM.  :func:`http_server` is a real HTTP server on
127.0.0.1 for the fetch tests (kernel.org, tarballs, the Debian archive).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Mapping, Union

from vm import errors
from vm.machine.ssh import Cmd, CommandResult, _argv_of, render

Response = Union[CommandResult, Callable[[str], "CommandResult | str | int | None"]]


class FakeConnection:
    """Scripted stand-in for :class:`GuestConnection` (same public API).

    ``responses`` maps a command prefix to a :class:`CommandResult` or to a
    callable taking the joined command and returning a CommandResult, a
    stdout string, an exit status, or None (exit 0).  The first registered
    prefix that the joined command starts with wins; unmatched commands exit
    0 with no output, or raise AssertionError when ``strict``.
    ``put_text``/``get_text`` use the ``files`` dict, ``put_bytes`` the ``blobs`` dict.
    """

    def __init__(self, responses: Mapping[str, Response] | None = None, *,
                 strict: bool = False, host: str = "127.0.0.1", port: int = 0) -> None:
        self.responses: dict[str, Response] = dict(responses or {})
        self.strict = strict
        self.host = host
        self.port = port
        self.calls: list[str] = []
        self.inputs: list[str | None] = []
        self.files: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}     # put_bytes
        self.modes: dict[str, int] = {}
        self._open = False
        self.opens = 0

    def expect(self, prefix: str, exit_status: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.responses[prefix] = CommandResult(prefix, exit_status, stdout, stderr)

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        if not self._open:
            self._open = True
            self.opens += 1

    def close(self) -> None:
        self._open = False

    def __enter__(self) -> "FakeConnection":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self, cmd: Cmd, *, timeout: float | None = None, input: str | None = None,
            check: bool = False, env: Mapping[str, str] | None = None) -> CommandResult:
        self.open()
        line = render(cmd, env)
        argv = _argv_of(cmd)
        self.calls.append(line)
        self.inputs.append(input)
        for prefix, response in self.responses.items():
            if line.startswith(prefix):
                break
        else:
            if self.strict:
                raise AssertionError(f"FakeConnection: unexpected command {line!r} "
                                     f"(expected one of {list(self.responses)!r})")
            response = CommandResult(argv, 0, "", "")
        if callable(response):
            response = response(line)
            if response is None:
                response = CommandResult(argv, 0, "", "")
            elif isinstance(response, str):
                response = CommandResult(argv, 0, response, "")
            elif isinstance(response, int):
                response = CommandResult(argv, response, "", "")
        if not isinstance(response, CommandResult):
            raise TypeError(f"FakeConnection response for {line!r} is {type(response).__name__}")
        result = dataclasses.replace(response, argv=argv)
        return result.check() if check else result

    def put_text(self, remote_path: str, text: str, mode: int = 0o644) -> None:
        self.open()
        self.files[remote_path] = text
        self.modes[remote_path] = mode

    def put_bytes(self, remote_path: str, data: bytes, mode: int = 0o644) -> None:
        self.open()
        self.blobs[remote_path] = bytes(data)
        self.modes[remote_path] = mode

    def get_text(self, remote_path: str) -> str:
        self.open()
        try:
            return self.files[remote_path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file in the fake guest",
                                    remote_path) from None

    def wait_until_up(self, deadline_s: float, *, abort: Callable[[], str | None] | None = None,
                      interval: float = 1.0) -> float:
        if abort is not None:
            reason = abort()
            if reason:
                raise errors.SSHUnreachable(host=self.host, port=self.port,
                                            reason=f"gave up waiting for sshd: {reason}",
                                            fix="see the guest console log")
        self.open()
        return 0.0


@dataclass
class Server:
    """What :func:`http_server` serves: ``files`` by path; paths in ``truncate`` send half
    the body while advertising the full Content-Length; ``log`` lists the paths asked for."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    truncate: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    def count(self, path: str) -> int:
        return self.log.count(path)


@contextlib.contextmanager
def http_server() -> Iterator[Server]:
    """A real HTTP server on 127.0.0.1 (an ephemeral port) for as long as the block lasts."""
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            state.log.append(self.path)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = self.path in state.truncate
            self.wfile.write(body[: len(body) // 2] if cut else body)
            self.wfile.flush()
            self.close_connection = cut

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
