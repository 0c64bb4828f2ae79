"""`invoke bisect` on a real kernel history (tests/bisect/history.py): full tier.

Builds, boots and runs volatile-to-volatile[ext4] at each step: the run must
name the commit that broke volatile reuse, record the commit where the series
does not apply as skipped (not as a regression), and leave the repository
exactly as it was.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bisect.history import make_history
from vm import bisect, pipeline
from vm.settings import load

pytestmark = [pytest.mark.slow, pytest.mark.guest]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def history():
    settings = load(base="6.12")
    tree = pipeline.get_tree(settings)
    return make_history(tree.path, settings.sub("bisect-history") / f"linux-{tree.key}")


def test_bisect_names_the_breaking_commit(history, tmp_path):
    before = bisect.snapshot(history.repo)
    env = dict(os.environ, INVOKE_OVL_RESULTS_DIR=str(tmp_path / "results"), INVOKE_OVL_BASE="6.12")
    res = subprocess.run([sys.executable, "-m", "invoke", "bisect", "--tree", str(history.repo),
                          "--good", history.base, "--bad", "master",
                          "--scenario", "volatile-to-volatile", "--fs", "ext4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(res.stdout)
    print(res.stderr[-6000:], file=sys.stderr)
    assert res.returncode == 0, res.stderr[-2000:]

    breaking = history.first("breaks-volatile-reuse")
    unappliable = history.first("series-stops-applying")
    result = json.loads((tmp_path / "results" / "bisect" / "volatile-to-volatile-ext4" / "result.json").read_text())
    assert result["first_bad"] == breaking
    assert result["first_bad_subject"] == "ovl: treat volatile as fsync=auto"
    assert f"first bad commit: {breaking}" in res.stdout
    steps = {s["commit"]: s for s in result["steps"]}
    assert steps[unappliable]["verdict"] == "skip"
    assert "series does not apply: 0003-" in steps[unappliable]["reason"]
    assert steps[breaking]["verdict"] == "bad"
    assert "dirty" in steps[breaking]["reason"]
    assert any(s["verdict"] == "good" for s in result["steps"]), "no step passed: nothing was proven good"
    for s in result["steps"]:
        assert Path(s["log"]).is_file() or s["verdict"] == "skip"

    assert bisect.snapshot(history.repo) == before
    assert subprocess.run(["git", "-C", str(history.repo), "bisect", "log"], capture_output=True).returncode != 0
