"""One fstests test (``./check -overlay -R xunit``) on one base fs and kernel.

The tests of a (kernel, fs) run in one batch (the ``fstests_batch`` fixture); each
case reports its test.  The case passes when fstests says it passed, is skipped as
``notrun: <reason>`` when fstests did not run it, and fails when fstests failed it,
when it hung past ``ovl.fstests_timeout`` from its own start (the guest was killed and
rebooted; the console tail is in the message) or when the kernel logged a splat in
that test's kmsg slice.  Artifacts land in ``<results_dir>/<variant>-<fs>/``.
"""

from __future__ import annotations

import pytest

from vm.suites import fstests

pytestmark = pytest.mark.guest


def test_fstests(fstest, fs, variant, fstests_batch, results_dir, record_property):
    outcome = fstests_batch[fstest]
    result = outcome.result
    record_property("fstests_seconds", f"{result.seconds:.0f}")
    if result.outcome == fstests.NOTRUN:
        pytest.skip(f"notrun: {result.message}")
    if result.outcome == fstests.FAILED:
        bad = results_dir / f"{variant}-{fs}" / f"{fstest}.out.bad"
        detail = outcome.detail or (bad.read_text()[-1500:] if bad.is_file() else "")
        pytest.fail(f"{fstest} failed on {fs} ({variant}): {result.message}"
                    + (f"\n{detail[-3000:]}" if detail else ""), pytrace=False)
    assert result.outcome == fstests.PASSED, result
