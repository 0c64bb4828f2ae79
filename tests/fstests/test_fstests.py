"""One fstests test (``./check -overlay -R xunit overlay/NNN``) on one base fs and kernel.

The case passes when fstests says it passed, is skipped as ``notrun: <reason>``
when fstests did not run it, and fails when fstests failed it, when it hangs
past ``ovl.fstests_timeout`` (the guest is killed and rebooted) or when the
kernel logged a splat meanwhile (the ``klog`` guard of tests/conftest.py).
Artifacts land in ``<results_dir>/<variant>-<fs>/``.
"""

from __future__ import annotations

import time

import pytest

from vm import errors
from vm.suites import fstests

pytestmark = pytest.mark.guest


def test_fstests(fstest, fs, variant, guest, fstests_env, klog, results_dir, settings, hung_guest):
    out_dir = results_dir / f"{variant}-{fs}"
    start = time.monotonic()
    try:
        res = guest.run(fstests.check_argv(fstest), timeout=settings.fstests_timeout)
    except (errors.GuestCommandTimeout, errors.SSHUnreachable) as exc:
        tail = hung_guest.console_tail()
        hung = fstests.TestResult(fstest, fstests.FAILED, f"no verdict in {settings.fstests_timeout:.0f}s "
                                  f"({type(exc).__name__}); guest killed and rebooted",
                                  time.monotonic() - start)
        out_dir.mkdir(parents=True, exist_ok=True)
        fstests.merge_xunit(out_dir / "result.xml", "", fstest, extra=hung)
        (out_dir / f"{fstest.replace('/', '-')}.console").write_text(tail + "\n")
        hung_guest.restart()
        pytest.fail(f"{hung.message}; console tail:\n{tail}", pytrace=False)
    result = fstests.collect(guest, fstest, fs, out_dir, res.stdout + res.stderr)
    if result.outcome == fstests.NOTRUN:
        pytest.skip(f"notrun: {result.message}")
    if result.outcome == fstests.FAILED:
        bad = out_dir / f"{fstest}.out.bad"
        detail = f"\n{bad.read_text()[-1500:]}" if bad.is_file() else f"\n{res.stdout[-1500:]}"
        pytest.fail(f"{fstest} failed on {fs} ({variant}): {result.message}{detail}", pytrace=False)
