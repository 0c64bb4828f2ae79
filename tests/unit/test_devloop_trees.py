"""`invoke test --source tree:DIR` on a series work tree (vm/devloop/trees.py), with real git.

The toy clone gets a real series branch from `invoke series checkout`'s own code
(gitseries.checkout); detection must find it only from the top of that work tree
on that branch, and the B/P plan must point B at the cover commit's parent in a
cache worktree, never at the user's checkouts.
"""

import dataclasses
from pathlib import Path

import pytest

from tests.unit.test_gitseries import COVER, _git, toy  # noqa: F401  (the toy clone fixture)
from vm import errors
from vm.devloop import series as devseries
from vm.devloop import trees
from vm.kernel import gitseries
from vm.kernel.patch import parse_series
from vm.settings import Settings

pytestmark = pytest.mark.unit


@pytest.fixture
def series_wt(toy, tmp_path):  # noqa: F811
    repo, patches = toy
    wt = tmp_path / "series-wt"
    gitseries.checkout(repo, wt, parse_series(patches / "series"), COVER, "7.2", "v1.0")
    return repo, wt


def _settings(tmp_path, base="7.2") -> Settings:
    return Settings.from_mapping({"base": base, "cache_dir": str(tmp_path / "cache")})


def test_detects_the_series_work_tree_and_its_base_commit(series_wt):
    repo, wt = series_wt
    found = trees.detect(wt)
    assert found is not None
    assert found.branch == "b4/ovl-volatile-7.2" and found.base == "7.2"
    assert found.base_commit == _git(repo, "rev-parse", "v1.0").strip()
    assert _git(wt, "log", "-1", "--format=%B", found.cover).count(gitseries.MARKER) == 1
    assert found.head == _git(wt, "rev-parse", "HEAD").strip()


def test_tree_source_that_is_not_a_series_branch_keeps_its_meaning(series_wt, tmp_path):
    repo, wt = series_wt
    plain = tmp_path / "plain-tree"
    plain.mkdir()
    (plain / "Makefile").write_text("VERSION = 7\n")
    assert trees.detect(repo) is None                    # the clone itself: on master, no cover commit
    assert trees.detect(plain) is None                   # not git at all
    assert trees.detect(wt / "nonexistent") is None
    sub = wt / "sub"
    sub.mkdir()
    assert trees.detect(sub) is None                     # inside the work tree, not its top
    assert trees.series_tree(f"tree:{plain}") is None
    assert trees.series_tree("debian") is None
    assert trees.series_tree(f"tree:{wt}").worktree == wt.resolve()


def test_a_detached_head_or_another_b4_branch_is_not_a_series_tree(series_wt):
    repo, wt = series_wt
    _git(wt, "checkout", "-q", "--detach")
    assert trees.detect(wt) is None
    _git(wt, "checkout", "-q", "-b", "b4/someone-else")
    # same commits (cover with our tracking key): still ours; strip the key and it is not
    assert trees.detect(wt) is not None
    _git(wt, "checkout", "-q", "--detach", "HEAD~2")
    _git(wt, "commit", "-q", "--amend", "--allow-empty", "-m", f"other\n\n{gitseries.MARKER}\n{{\"series\": {{}}}}\n")
    _git(wt, "checkout", "-q", "-B", "b4/someone-else")
    assert trees.detect(wt) is None


def test_uncommitted_edits_do_not_change_detection(series_wt):
    _, wt = series_wt
    (wt / "a.c").write_text("int a = 42; /* wip */\n")
    assert trees.detect(wt) is not None


def test_plan_puts_b_in_a_cache_worktree_and_p_on_the_work_tree(series_wt, tmp_path):
    repo, wt = series_wt
    found = trees.detect(wt)
    tp = trees.plan(_settings(tmp_path), found)
    cache = (tmp_path / "cache").resolve()
    assert tp.root.parent == cache / "devloop" and tp.root.name == f"{found.repo_key}-7.2"
    assert tp.baseline.src == tp.root / "baseline" / "src" and tp.baseline.commit == found.base_commit
    assert tp.baseline.obj == tp.root / "baseline" / "obj"       # beside src, as under builds/ (ccache)
    assert tp.patched.src == wt.resolve() and tp.patched.commit is None
    assert tp.patched.obj == tp.root / "patched" / "obj"
    assert (tp.baseline.judged_as, tp.patched.judged_as) == ("baseline", "patched")
    # never an `invoke boot --detach` guest's label, nor another clone's or base's loop guest's
    assert tp.patched.label == f"devloop-patched-{found.repo_key[:6]}-7.2"
    assert tp.baseline.label == f"devloop-baseline-{found.repo_key[:6]}-7.2"
    assert tp.baseline.key == found.base_commit[:12] and tp.patched.key == "worktree"


def test_the_repo_key_is_the_clones_not_the_worktrees(series_wt, tmp_path):
    repo, wt = series_wt
    other = tmp_path / "second-wt"
    _git(repo, "worktree", "add", "-q", "-b", "b4/ovl-volatile-7.2-copy", str(other), "b4/ovl-volatile-7.2")
    assert trees.detect(other).repo_key == trees.detect(wt).repo_key


def test_plan_refuses_a_branch_of_another_base(series_wt, tmp_path):
    _, wt = series_wt
    with pytest.raises(errors.BadArgument, match="pass --base 7.2"):
        trees.plan(_settings(tmp_path, base="6.12"), trees.detect(wt))


def test_baseline_worktree_is_checked_out_and_moved_without_touching_the_user(series_wt, tmp_path):
    repo, wt = series_wt
    (wt / "a.c").write_text("int a = 42; /* the user's wip */\n")
    user_status = _git(repo, "status", "--porcelain"), _git(wt, "status", "--porcelain")
    found = trees.detect(wt)
    tp = trees.plan(_settings(tmp_path), found)
    trees.checkout_baseline(found, tp.baseline)
    src = tp.baseline.src
    assert _git(src, "rev-parse", "HEAD").strip() == found.base_commit
    assert (src / "a.c").read_text() == "int a;\n"               # B: no patch of the series
    mtime = (src / "c.c").stat().st_mtime_ns
    trees.checkout_baseline(found, tp.baseline)                  # again: nothing rewritten
    assert (src / "c.c").stat().st_mtime_ns == mtime
    moved = trees.DevBuild(tp.baseline.label, "baseline", src, tp.baseline.obj, tp.baseline.kdir,
                           _git(wt, "rev-parse", "HEAD~1").strip())
    trees.checkout_baseline(found, moved)                        # a new base: moved, only changed files
    assert (src / "a.c").read_text() == "int a = 1;\n"
    assert (src / "c.c").stat().st_mtime_ns == mtime
    assert (_git(repo, "status", "--porcelain"), _git(wt, "status", "--porcelain")) == user_status
    assert _git(wt, "symbolic-ref", "HEAD").strip() == "refs/heads/b4/ovl-volatile-7.2"


def test_require_series_tree_says_why(tmp_path):
    with pytest.raises(errors.NotASeriesTree, match="invoke series checkout"):
        trees.require_series_tree(tmp_path)
    with pytest.raises(errors.NotASeriesTree, match="no such directory"):
        trees.require_series_tree(tmp_path / "missing")
    assert "fix:" in str(errors.NotASeriesTree(tree=Path("/x"), why="y"))


def test_the_default_series_worktree_sits_beside_ps_o_dir(series_wt, tmp_path):
    """src/ and obj/ side by side, as under builds/: ccache's relative paths then match."""
    repo, wt = series_wt
    settings = _settings(tmp_path)
    default = devseries.default_worktree(settings, repo)
    _git(repo, "worktree", "add", "-q", "-b", "b4/ovl-volatile-7.2-default", str(default), "b4/ovl-volatile-7.2")
    tp = trees.plan(settings, trees.detect(default))
    assert tp.patched.src == default.resolve()
    assert tp.patched.src.parent == tp.patched.obj.parent and tp.patched.src.name == "src"
    assert tp.baseline.src.parent == tp.baseline.obj.parent and tp.baseline.src.name == "src"


def test_two_clones_and_two_bases_have_loop_guests_of_their_own(series_wt, tmp_path):
    """A detached boot stops the idle guests of its label: the loops of two clones (or of
    two bases in one clone) must not share one, or each retest kills the other's guest."""
    repo, wt = series_wt
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", "-b", "b4/ovl-volatile-7.2", str(repo), str(clone))
    one, other = trees.detect(wt), trees.detect(clone)
    assert one is not None and other is not None and one.repo_key != other.repo_key
    labels = {trees.plan(_settings(tmp_path), f).patched.label for f in (one, other)}
    settings_61 = dataclasses.replace(_settings(tmp_path), base="6.1")
    labels.add(trees.plan(settings_61, dataclasses.replace(one, base=None)).patched.label)
    assert len(labels) == 3, labels
