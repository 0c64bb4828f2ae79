"""``--require-inputs``: a missing input fails the test instead of skipping it.

A tiny test file using the ``missing_input`` fixture of tests/conftest.py runs
in a pytest subprocess, with and without the option.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

NEEDS_AN_INPUT = '''
def test_needs_an_input(missing_input):
    missing_input("/nonexistent/input", "install it")
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_needs_input.py").write_text(NEEDS_AN_INPUT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-q", "-rfs", "test_needs_input.py", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_input_fails_with_require_inputs(tmp_path):
    res = _pytest(tmp_path, "--require-inputs")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "1 failed" in res.stdout and "skipped" not in res.stdout, res.stdout
    assert "/nonexistent/input is missing: install it (--require-inputs" in res.stdout, res.stdout


def test_missing_input_skips_without_it(tmp_path):
    res = _pytest(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout and "failed" not in res.stdout, res.stdout
    assert "/nonexistent/input is missing: install it" in res.stdout, res.stdout
