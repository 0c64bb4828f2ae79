"""`invoke series checkout` / `export` (issue 13) on a real kernel history, with the real series.

The user's clone is a clone of an import commit of the main base's real tree
(tests/bisect/history.py, no edits), tagged as the base's version, with an
uncommitted edit and an untracked file of the user's.  The series is exported
into a copy of ``patches/`` (the checkout's own are never written):

1. an untouched round trip changes nothing, byte for byte (series, patches,
   cover letter);
2. a fixup of one patch (``git rebase -i --autosquash``) comes back as exactly
   that patch, carrying the edit; a new commit comes back as a new patch in
   the series file; ``git am`` of the export onto the base gives the branch's
   tree;
3. the user's clone (HEAD, branch, status, worktree list) is untouched.

No kernel is built or booted: it is in tests/bisect (the `slow` suite of
`invoke ci`) for the real tree and history it shares with the bisect test.
"""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.bisect.history import make_history
from vm import pipeline, runner
from vm.devloop import series as devseries
from vm.kernel import gitseries
from vm.kernel.patch import parse_series
from vm.settings import load

pytestmark = [pytest.mark.slow, pytest.mark.roundtrip]
ROOT = Path(__file__).resolve().parents[2]
ME = "Round Trip <round.trip@example.org>"
FIXED = "readdir.c"          # the file the fixup edits: one patch of the series touches it


def git(repo: Path, *args: str, env: dict | None = None) -> str:
    return runner.run(["git", "-C", repo, "-c", "commit.gpgsign=false", *args], env=env, quiet=True).stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(settings on a copy of patches/, the user's clone, the tree) for the main base."""
    settings = load()
    tree = pipeline.get_tree(settings)
    history = make_history(tree.path, settings.sub("bisect-history") / f"import-{tree.key}", edits=())
    tmp = tmp_path_factory.mktemp("roundtrip")
    project = tmp / "project"
    shutil.copytree(ROOT / "patches", project / "patches")
    clone = tmp / "linux"
    git(tmp, "clone", "-q", "--shared", str(history.repo), str(clone))
    name, email = ME[:-1].split(" <")
    git(clone, "config", "user.name", name)
    git(clone, "config", "user.email", email)
    git(clone, "tag", f"v{tree.version}", history.base)
    # the user's work in progress, which no series command may touch
    (clone / "fs/overlayfs/Kconfig").write_text((clone / "fs/overlayfs/Kconfig").read_text() + "# wip\n")
    (clone / "notes.txt").write_text("untracked\n")
    return replace(settings, project_root=project), clone, tree


def snapshot(patches: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(patches.iterdir()) if p.is_file()}


def worktree_list(clone: Path) -> list[str]:
    return [line for line in git(clone, "worktree", "list", "--porcelain").splitlines()
            if line.startswith(("worktree ", "branch ", "HEAD "))]


def test_round_trip_on_a_real_history(setup, tmp_path):
    settings, clone, tree = setup
    patches = settings.patches_dir
    assert patches != ROOT / "patches" / settings.base
    user, worktrees_before = gitseries.user_state(clone), worktree_list(clone)
    original = snapshot(patches)
    assert original == snapshot(ROOT / "patches" / settings.base)

    # 1. checkout on the tag of the base's version, export untouched: nothing changes
    done = devseries.series_checkout(settings, clone, worktree=tmp_path / "wt")
    wt, branch = done.worktree, done.branch
    assert done.onto == git(clone, "rev-parse", f"v{tree.version}^{{commit}}").strip()
    assert done.patches == len(parse_series(patches / "series")) == 4
    assert worktree_list(clone) == worktrees_before + [f"worktree {wt}", f"HEAD {done.head}",
                                                        f"branch refs/heads/{branch}"]
    res = devseries.series_export(settings, clone, lint=False)
    assert not res.exported.changed and not res.cover_written, (res.exported, res.cover_written)
    assert snapshot(patches) == original
    assert gitseries.user_state(clone) == user

    # 2a. a fixup of the one patch that touches readdir.c, squashed by a non-interactive rebase
    commits = git(clone, "rev-list", "--reverse", f"{done.cover}..{branch}").split()
    touching = [c for c in commits if f"fs/overlayfs/{FIXED}" in git(clone, "show", "--format=", "--name-only", c)]
    assert len(touching) == 1, touching
    target = commits.index(touching[0])
    name = parse_series(patches / "series").patches[target].name
    path = wt / "fs/overlayfs" / FIXED
    old = " * Check an entry of \"$workdir/work/incompat\"."
    new = " * Check one entry of \"$workdir/work/incompat\" (round trip)."
    assert path.read_text().count(old) == 1 and f"+{old}" in original[name].decode()
    path.write_text(path.read_text().replace(old, new))
    git(wt, "commit", "-q", "-a", f"--fixup={touching[0]}")
    git(wt, "rebase", "-q", "-i", "--autosquash", done.cover, env={"GIT_SEQUENCE_EDITOR": "true"})
    assert len(git(clone, "rev-list", f"{done.cover}..{branch}").split()) == 4
    ex = gitseries.export(clone, branch, patches)      # the patches alone: no cover-letter render
    assert ex.written == (name,) and not ex.removed
    assert not ex.series_file_changed
    after_fixup = snapshot(patches)
    text = after_fixup[name].decode()
    assert f"+{new}" in text and f"+{old}" not in text
    assert {n for n in original if after_fixup[n] != original[n]} == {name}

    # 2b. a new commit on top: a fifth patch in the series, the others as they were
    copy_up = wt / "fs/overlayfs/copy_up.c"
    copy_up.write_text(copy_up.read_text().replace(
        "int ovl_copy_up(struct dentry *dentry)\n",
        "/* round trip: a new commit on the series branch */\nint ovl_copy_up(struct dentry *dentry)\n", 1))
    git(wt, "commit", "-q", "-a", "-s", "-m", "ovl: a note on ovl_copy_up\n\nA new patch, made on the branch.")
    ex = gitseries.export(clone, branch, patches)      # the patches alone: no cover-letter render
    listed = [p.name for p in parse_series(patches / "series").patches]
    assert listed[:4] == [p.name for p in parse_series(ROOT / "patches" / settings.base / "series").patches]
    assert len(listed) == 5 and listed[-1].startswith("0005-ovl-a-note-on-ovl_copy_up")
    assert ex.series_file_changed and not ex.removed
    assert "+/* round trip: a new commit on the series branch */" in (patches / listed[-1]).read_text()
    final = snapshot(patches)
    # the four others are rewritten for their subject alone: [PATCH k/4] is now [PATCH k/5]
    for k, n in enumerate(listed[:4], 1):
        renumbered = after_fixup[n].decode().replace(f"[PATCH {k}/4]", f"[PATCH {k}/5]", 1)
        assert renumbered != after_fixup[n].decode()
        assert gitseries.essence(final[n].decode()) == gitseries.essence(renumbered), n
    assert set(final) == set(after_fixup) | {listed[-1]}

    # 2c. `git am` of the exported series onto the base gives the branch's tree
    git(wt, "checkout", "-q", "--detach", done.onto)
    git(wt, "am", "-q", *[str(patches / n) for n in listed])
    assert git(wt, "rev-parse", "HEAD^{tree}") == git(clone, "rev-parse", f"{branch}^{{tree}}")
    assert git(wt, "rev-parse", "HEAD^{tree}") != git(wt, "rev-parse", f"{done.onto}^{{tree}}")

    # 3. the user's clone: same HEAD, branch and status; the series worktree was its only addition
    assert gitseries.user_state(clone) == user
    assert (clone / "notes.txt").read_text() == "untracked\n"
    git(clone, "worktree", "remove", "--force", str(wt))
    assert worktree_list(clone) == worktrees_before
