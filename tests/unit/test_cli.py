"""The Invoke CLI on bad input: one line naming cause and fix, non-zero exit, nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def invoke(*args, cache):
    env = dict(os.environ, INVOKE_OVL_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def error_lines(res):
    return [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "infrastructure error:"))]


def test_corrupt_tarball(tmp_path):
    bad = tmp_path / "linux-6.12.1.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 definitely not xz")
    res = invoke("fetch", "--source", f"tarball:{bad}", cache=tmp_path / "cache")
    assert res.returncode == 2
    (line,) = error_lines(res)
    assert "fix:" in line
    assert not any((tmp_path / "cache" / "sources" / "trees").glob("*")), "no half tree kept"


def test_missing_tree(tmp_path):
    res = invoke("fetch", "--source", f"tree:{tmp_path / 'nope'}", cache=tmp_path / "cache")
    assert res.returncode == 2 and len(error_lines(res)) == 1


def test_patch_that_does_not_apply(tmp_path):
    tree = tmp_path / "linux"
    (tree / "fs").mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 1\nEXTRAVERSION =\n")
    (tree / "fs" / "super.c").write_text("/* not the real fs/super.c */\n")
    res = invoke("build", "--variants", "patched", "--source", f"tree:{tree}", cache=tmp_path / "cache")
    assert res.returncode == 2, res.stderr
    (line,) = error_lines(res)
    assert "0001-fs-add-s_instance_id-to-struct-super_block.patch does not apply" in line
    assert "fix:" in line
    builds = tmp_path / "cache" / "builds"
    assert not list(builds.glob("*/src")), "no partly patched tree may remain"
    assert (tree / "fs" / "super.c").read_text() == "/* not the real fs/super.c */\n"


def test_unknown_variant(tmp_path):
    res = invoke("build", "--variants", "nonsense", "--source", "debian", cache=tmp_path / "cache")
    assert res.returncode == 2
    assert "unknown kernel variant 'nonsense'" in error_lines(res)[0]


def test_ssh_without_guest(tmp_path):
    res = invoke("ssh", "-c", "true", cache=tmp_path / "cache")
    assert res.returncode == 3
    assert "no guest is running" in error_lines(res)[0]


def test_matrix_with_an_unknown_base(tmp_path):
    res = invoke("matrix", "--bases", "6.1,9.9", cache=tmp_path / "cache")
    assert res.returncode == 2, res.stderr
    (line,) = error_lines(res)
    assert "base '9.9' has no" in line and "patches/9.9/series" in line and "fix:" in line
    assert not (tmp_path / "cache" / "builds").exists() or not any((tmp_path / "cache" / "builds").iterdir())
