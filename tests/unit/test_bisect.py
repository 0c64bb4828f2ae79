"""Bisect orchestration on a tiny git history, with real git and real `git bisect run`.

The step's judge is a command (``--run``) instead of a kernel build + boot, so
these run in seconds; tests/bisect/ does the same on a real kernel history.
The history mirrors that one: c2 makes the series stop applying, c3 undoes
it, c4 breaks the behaviour; good = c0, bad = c5.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vm import bisect, errors
from vm.settings import Settings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

# c2 rewords a line the patch replaces, so no fuzz can apply it there
# the judge: abort (255) if the series is not applied, bad if the behaviour broke
JUDGE = ("import sys; s = open('readdir.c').read(); v = open('vol.c').read(); "
         "sys.exit(255 if 'patched by the series' not in s else (0 if 'reuse = 1' in v else 1))")

PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Test <t@example.com>
Subject: [PATCH] toy: the series

---
 readdir.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

--- a/readdir.c
+++ b/readdir.c
@@ -1,3 +1,3 @@
 one
-two
+two, patched by the series
 three
"""


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _commit(repo, message, **files):
    for name, text in files.items():
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def history(tmp_path):
    repo = tmp_path / "linux"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "Test")
    shas = [_commit(repo, "c0: import", **{"readdir.c": "one\ntwo\nthree\n", "vol.c": "reuse = 1\n",
                                           "other.c": "0\n"})]
    shas.append(_commit(repo, "c1: harmless", **{"other.c": "1\n"}))
    shas.append(_commit(repo, "c2: reword the context the series needs", **{"readdir.c": "one\nTWO\nthree\n"}))
    shas.append(_commit(repo, "c3: undo c2", **{"readdir.c": "one\ntwo\nthree\n"}))
    shas.append(_commit(repo, "c4: break volatile reuse", **{"vol.c": "reuse = 0\n"}))
    shas.append(_commit(repo, "c5: harmless", **{"other.c": "5\n"}))
    # the user has work in progress: it must survive untouched
    (repo / "other.c").write_text("uncommitted edit\n")
    (repo / "notes.txt").write_text("untracked\n")
    series = tmp_path / "patches" / "series"
    series.parent.mkdir()
    (series.parent / "0001-toy.patch").write_text(PATCH)
    series.write_text("0001-toy.patch\n")
    return repo, shas, series


def _settings(tmp_path):
    return Settings.from_mapping({}, cache_dir=tmp_path / "cache", results_dir=tmp_path / "results",
                                 project_root=ROOT)


def _state(repo):
    return (bisect.snapshot(repo), (repo / "other.c").read_text(), (repo / "notes.txt").read_text())


def test_names_first_bad_commit_and_records_the_skip(history, tmp_path):
    repo, shas, series = history
    before = _state(repo)
    req = bisect.Request(tree=repo, good=shas[0], bad="main", command=(sys.executable, "-c", JUDGE))
    result = bisect.bisect(_settings(tmp_path), req, series)

    assert result.first_bad == shas[4]
    assert result.first_bad_subject == "c4: break volatile reuse"
    by_commit = {s.commit: s for s in result.steps}
    skipped = by_commit[shas[2]]
    assert skipped.verdict == "skip"
    assert "series does not apply: 0001-toy.patch" in skipped.reason and "readdir.c hunk #1" in skipped.reason
    assert by_commit[shas[4]].verdict == "bad" and by_commit[shas[3]].verdict == "good"
    # the user's tree: same HEAD, branch, index, worktree (edits kept), no bisect, no extra worktree
    assert _state(repo) == before
    assert _git(repo, "worktree", "list").count("\n") == 1
    assert subprocess.run(["git", "-C", str(repo), "bisect", "log"], capture_output=True).returncode != 0
    report = (result.report_dir / "report.md").read_text()
    assert shas[4] in report and "series does not apply" in report
    assert json.loads((result.report_dir / "result.json").read_text())["first_bad"] == shas[4]


def test_only_skipped_commits_left(history, tmp_path):
    """good=c1, bad=c3 with c2 unappliable and c3 bad: git cannot decide, and says so."""
    repo, shas, series = history
    req = bisect.Request(tree=repo, good=shas[1], bad=shas[3], command=(sys.executable, "-c", "raise SystemExit(1)"))
    result = bisect.bisect(_settings(tmp_path), req, series)
    assert result.first_bad is None
    assert set(result.candidates) == {shas[2], shas[3]}
    assert [s.verdict for s in result.steps] == ["skip"]


def test_aborting_step_is_an_error_and_tree_is_restored(history, tmp_path):
    repo, shas, series = history
    before = _state(repo)
    req = bisect.Request(tree=repo, good=shas[0], bad="main", command=(sys.executable, "-c", "raise SystemExit(200)"))
    with pytest.raises(errors.BisectFailed, match="command exited 200"):
        bisect.bisect(_settings(tmp_path), req, series)
    assert _state(repo) == before


@pytest.mark.parametrize("good,bad,match", [
    ("nope", "main", "--good 'nope' is not a commit"),
    ("main", "main", "same commit"),
    ("main", "HEAD~5", "not an ancestor"),
], ids=["unknown-ref", "same-commit", "reversed"])
def test_bad_refs(history, tmp_path, good, bad, match):
    repo, _, series = history
    with pytest.raises(errors.UserError, match=match):
        bisect.bisect(_settings(tmp_path), bisect.Request(tree=repo, good=good, bad=bad, command=("true",)),
                      series)


def test_not_a_repository(tmp_path):
    with pytest.raises(errors.UserError, match="is not a git work tree"):
        bisect.bisect(_settings(tmp_path), bisect.Request(tree=tmp_path, good="a", bad="b", command=("true",)),
                      tmp_path / "series")


def test_request_needs_one_judge():
    with pytest.raises(errors.UserError, match="exactly one of --scenario and --run"):
        bisect.Request(tree=Path("."), good="a", bad="b")
    with pytest.raises(errors.UserError, match="use one of skip, bad"):
        bisect.Request(tree=Path("."), good="a", bad="b", scenario="fresh-volatile", on_boot_failure="maybe")


def test_keep_mtimes(tmp_path):
    memo = tmp_path / "mtimes.json"
    f = tmp_path / "fs.h"
    f.write_text("patched\n")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert bisect.keep_mtimes(tmp_path, ["fs.h"], memo) == 0          # first sighting: recorded
    f.write_text("patched\n")                                           # re-applied: same content, new mtime
    assert bisect.keep_mtimes(tmp_path, ["fs.h"], memo) == 1
    assert f.stat().st_mtime_ns == 1_000_000_000
    f.write_text("patched differently\n")                               # new content keeps its new mtime
    assert bisect.keep_mtimes(tmp_path, ["fs.h"], memo) == 0
    assert f.stat().st_mtime_ns != 1_000_000_000


def test_parse_run_output():
    sha = "a" * 40
    assert bisect.parse_run_output(f"running x\n{sha} is the first bad commit\ncommit {sha}\n") == (sha, [sha])
    text = ("There are only 'skip'ped commits left to test.\nThe first bad commit could be any of:\n"
            f"{'b' * 40}\n{'c' * 40}\nWe cannot bisect more!\n")
    assert bisect.parse_run_output(text) == (None, ["b" * 40, "c" * 40])
    assert bisect.parse_run_output("bisect run failed:\n") == (None, [])


def test_ctrl_c_resets_the_bisect(history, tmp_path):
    """Ctrl-C in the middle of a step: exit 130, the tree as it was, the step's command gone."""
    repo, shas, series = history
    before = _state(repo)
    marker = tmp_path / "step-started"
    judge = (f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    env = dict(os.environ, INVOKE_OVL_CACHE_DIR=str(tmp_path / "cache"),
               INVOKE_OVL_RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "bisect", "--tree", str(repo), "--good", shas[0],
                             "--bad", "main", "--series", str(series),
                             "--run", f"{sys.executable} -c {judge!r}"],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # as from a terminal: a run started in the background (nohup, `cmd &`,
                            # an `invoke ci` lane) inherits SIGINT ignored, and Ctrl-C would do nothing
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not marker.is_file() or not marker.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)      # what the terminal does on Ctrl-C
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    stat = Path(f"/proc/{int(marker.read_text())}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the step kept running"
    assert _state(repo) == before
    assert _git(repo, "worktree", "list").count("\n") == 1
    result = json.loads((tmp_path / "results" / "bisect" / "command" / "result.json").read_text())
    assert result["status"] == "interrupted"


def test_cli_one_line_error_for_unknown_scenario(history, tmp_path):
    repo, shas, _ = history
    env = dict(os.environ, INVOKE_OVL_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-m", "invoke", "bisect", "--tree", str(repo), "--good", shas[0],
                          "--bad", "main", "--scenario", "no-such-row"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unknown scenario 'no-such-row'" in lines[0] and "fix:" in lines[0]


def test_a_crashing_step_aborts_instead_of_reading_as_bad(tmp_path):
    """git bisect run takes exit 1 (Python's for an uncaught exception) as "bad"."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"worktree": str(tmp_path)}))      # not even a git tree
    assert bisect.main(["step", str(state)]) == bisect.ABORT
    assert bisect.main(["nonsense"]) == bisect.ABORT


def test_a_broken_series_is_refused_before_anything_starts(history, tmp_path):
    repo, shas, series = history
    before = _state(repo)
    series.write_text("0001-toy.patch\nmissing.patch\n")
    req = bisect.Request(tree=repo, good=shas[0], bad="main", command=("true",))
    with pytest.raises(errors.SeriesError, match="missing.patch does not exist"):
        bisect.bisect(_settings(tmp_path), req, series)
    assert _state(repo) == before
    assert not (tmp_path / "results" / "bisect").exists()


def test_a_worktree_left_by_a_killed_run_is_cleaned_up(history, tmp_path):
    """A run killed with SIGKILL leaves its worktree registered; the next run removes it."""
    repo, shas, series = history
    settings = _settings(tmp_path)
    req = bisect.Request(tree=repo, good=shas[0], bad="main", command=(sys.executable, "-c", JUDGE))
    root = settings.sub("bisect") / bisect.state_key(repo, "")
    _git(repo, "worktree", "add", "--detach", "-q", str(root / "src"), shas[2])
    result = bisect.bisect(settings, req, series)
    assert result.first_bad == shas[4]
    assert _git(repo, "worktree", "list").count("\n") == 1
