"""A guest command that outlives its timeout is killed in the guest, with what it started.

Rendering (:func:`vm.machine.ssh.tagged`, :func:`vm.machine.ssh.kill_tagged`) is
checked as text and by running it in a real local shell; the last test runs a
hanging command through a real sshd on 127.0.0.1 (the fixtures of test_ssh.py).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.unit.test_ssh import conn, keys, sshd_factory, sshd_port  # noqa: F401  (fixtures)
from vm import errors
from vm.machine.ssh import TAG_VAR, kill_tagged, render, tagged
from vm.runner import pid_alive

pytestmark = pytest.mark.unit


def test_a_list_command_is_tagged_and_execd():
    line = render(["echo", "a b", "$X"])
    assert tagged(line, "abc123", simple=True) == \
        f"{TAG_VAR}=abc123; export {TAG_VAR}; exec echo 'a b' '$X'"


def test_a_snippet_is_tagged_but_not_execd():
    assert tagged("cd /tmp && ls; true", "f00", simple=False) == \
        f"{TAG_VAR}=f00; export {TAG_VAR}; cd /tmp && ls; true"


def test_env_is_kept_after_the_tag():
    line = render("echo $A", env={"A": "1"})
    assert tagged(line, "t1", simple=True) == f"{TAG_VAR}=t1; export {TAG_VAR}; exec env A=1 sh -c 'echo $A'"


@pytest.mark.parametrize("tag", ["", "a b", "x;rm", "$(id)"])
def test_a_tag_is_never_shell_text(tag):
    with pytest.raises(ValueError):
        tagged("true", tag, simple=True)
    with pytest.raises(ValueError):
        kill_tagged(tag)


def _bash(line: str, **kwargs) -> subprocess.Popen:
    """``line`` the way sshd runs it: ``<login shell> -c line`` (root's shell is bash)."""
    return subprocess.Popen(["bash", "-c", line], stdout=subprocess.PIPE, text=True, **kwargs)


def test_an_execd_command_keeps_the_shells_pid_and_sees_the_tag():
    proc = _bash(tagged(render(["sh", "-c", f'echo "$$ ${TAG_VAR}"']), "d00d", simple=True))
    out, _ = proc.communicate(timeout=10)
    assert out.split() == [str(proc.pid), "d00d"]


def test_kill_tagged_ends_the_command_and_what_it_started():
    tag = "feed" + os.urandom(4).hex()
    # a tree: the shell, a background sleep in a new session (escapes a process group kill)
    snippet = 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!; exec sleep 301'
    proc = _bash(tagged(snippet, tag, simple=False), start_new_session=True)
    child = int(proc.stdout.readline())
    try:
        assert pid_alive(child) and proc.poll() is None
        other = subprocess.Popen(["sleep", "302"])          # not tagged: must survive
        done = subprocess.run(["sh", "-c", kill_tagged(tag)], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child)
        assert other.poll() is None
        other.kill()
        other.wait()
    finally:
        for pid in (proc.pid, child):
            if pid_alive(pid):
                os.kill(pid, 9)


def test_kill_tagged_with_nothing_to_kill_succeeds():
    assert subprocess.run(["sh", "-c", kill_tagged("0123abcd")], timeout=20).returncode == 0


@pytest.mark.sshd
def test_a_timed_out_command_is_gone_afterwards(conn):  # noqa: F811
    # unique durations, so that pgrep sees only these two sleeps
    first, second = (f"{os.getpid()}.{n}{time.monotonic_ns() % 100000}" for n in (1, 2))
    start = time.monotonic()
    with pytest.raises(errors.GuestCommandTimeout, match=r"within 1s .*killed in the guest"):
        conn.run(["sh", "-c", f"sleep {first} & exec sleep {second}"], timeout=1)
    assert time.monotonic() - start < 5
    # the same connection still works, and neither sleep is left (the guest is this host)
    left = conn.run(["pgrep", "-f", f"sleep ({first}|{second})$"])
    assert left.exit_status == 1, left.stdout
