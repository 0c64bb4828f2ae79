"""`invoke series checkout/export` (vm/kernel/gitseries.py) on a toy git history, with real git.

The series is made by `git format-patch` from a scratch branch; the checkout
must leave the user's checkout (HEAD, branch, uncommitted edits, untracked
files) as it was; an untouched round trip changes no file; a commit on the
branch comes back as exactly one changed patch.  tests/bisect/test_series_roundtrip.py
does the same on a real kernel history with the real series.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vm import errors
from vm.kernel import gitseries
from vm.kernel.patch import parse_series

pytestmark = pytest.mark.unit

ME = ("Test Dev", "dev@example.org")
COVER = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Test Dev <dev@example.org>
Date: Mon, 23 Nov 2026 21:10:15 +0000
Subject: [PATCH v3 0/2] toy: reusable things
Cc: A Maintainer <a@example.org>,
    list@example.org

The toy series.

Test Dev (2):
  toy: one
  toy: two
"""


def _git(repo, *args, env=None):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def _commit(repo, message, when, **files):
    for name, text in files.items():
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    date = f"@{1700000000 + when} +0000"
    _git(repo, "commit", "-q", "-s", "-m", message, env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})


@pytest.fixture
def toy(tmp_path):
    repo = tmp_path / "linux"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "master")
    _git(repo, "config", "user.name", ME[0])
    _git(repo, "config", "user.email", ME[1])
    _commit(repo, "import", 0, **{"a.c": "int a;\n", "b.c": "int b;\n", "c.c": "int c;\n"})
    _git(repo, "tag", "v1.0")
    _git(repo, "checkout", "-q", "-b", "work")
    _commit(repo, "toy: one\n\nThe first change.", 1, **{"a.c": "int a = 1;\n"})
    _commit(repo, "toy: two\n\nThe second change.", 2, **{"b.c": "int b = 2;\n"})
    patches = tmp_path / "patches" / "toy"
    patches.mkdir(parents=True)
    _git(repo, "format-patch", "-q", "--numbered", "-o", str(patches), "v1.0..work")
    names = sorted(p.name for p in patches.glob("*.patch"))
    (patches / "series").write_text("# the toy series\n" + "\n".join(names) + "\n")
    (patches / "0000-cover-letter.patch").write_text(COVER)
    _git(repo, "checkout", "-q", "master")
    _git(repo, "branch", "-q", "-D", "work")
    # the user's work in progress: must survive every command untouched
    (repo / "c.c").write_text("uncommitted edit\n")
    (repo / "notes.txt").write_text("untracked\n")
    return repo, patches


def _snapshot(patches: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(patches.iterdir())}


def _checkout(repo, patches, tmp_path, **kw):
    return gitseries.checkout(repo, tmp_path / "wt", parse_series(patches / "series"),
                              (patches / "0000-cover-letter.patch").read_text(), "toy", "v1.0", **kw)


def test_checkout_makes_a_b4_branch_in_a_worktree_and_leaves_the_user_checkout(toy, tmp_path):
    repo, patches = toy
    before = gitseries.user_state(repo)
    done = _checkout(repo, patches, tmp_path)
    assert gitseries.user_state(repo) == before
    assert (repo / "c.c").read_text() == "uncommitted edit\n"
    assert done.branch == "b4/ovl-volatile-toy" and done.worktree == tmp_path / "wt"
    assert _git(done.worktree, "symbolic-ref", "HEAD").strip() == "refs/heads/b4/ovl-volatile-toy"
    log = _git(repo, "log", "--format=%s|%an|%ad", "--date=raw", "v1.0..b4/ovl-volatile-toy").splitlines()
    assert log == ["toy: two|Test Dev|1700000002 +0000", "toy: one|Test Dev|1700000001 +0000",
                   f"toy: reusable things|Test Dev|{log[2].split('|')[2]}"]
    # the cover commit: empty, b4's marker and tracking JSON, the Cc as trailers
    assert _git(repo, "diff", "--stat", f"{done.cover}^", done.cover) == ""
    message = _git(repo, "show", "-s", "--format=%B", done.cover)
    assert "The toy series." in message and "Cc: A Maintainer <a@example.org>" in message
    text, tracking = gitseries.parse_cover(message)
    assert tracking["series"]["revision"] == 3 and tracking["series"]["change-id"]
    assert tracking["ovl-volatile-harness"]["base"] == "toy"
    assert _git(repo, "config", "branch.b4/ovl-volatile-toy.b4-prep-cover-strategy").strip() == "commit"


def test_an_untouched_round_trip_changes_nothing(toy, tmp_path):
    repo, patches = toy
    before = _snapshot(patches)
    _checkout(repo, patches, tmp_path)
    done = gitseries.export(repo, "b4/ovl-volatile-toy", patches)
    assert not done.changed and len(done.kept) == 2
    assert _snapshot(patches) == before
    assert not done.series.cover_edited


def test_a_commit_on_the_branch_comes_back_as_one_changed_patch(toy, tmp_path):
    repo, patches = toy
    before = _snapshot(patches)
    wt = _checkout(repo, patches, tmp_path).worktree
    # amend patch 2 the way a developer does: a fixup commit, then an autosquash rebase
    (wt / "b.c").write_text("int b = 22;\n")
    _git(wt, "commit", "-q", "-a", "--fixup", "HEAD")
    _git(wt, "rebase", "-q", "-i", "--autosquash", "HEAD~3", env={"GIT_SEQUENCE_EDITOR": "true"})
    done = gitseries.export(wt, "b4/ovl-volatile-toy", patches)
    after = _snapshot(patches)
    one, two = sorted(n for n in before if n.startswith(("0001", "0002")))
    assert done.written == (two,) and done.kept == (one,)
    assert after[one] == before[one]
    assert "+int b = 22;" in after[two].decode() and "Date: Tue, 14 Nov 2023" in after[two].decode()
    assert {k: v for k, v in after.items() if k != two} == {k: v for k, v in before.items() if k != two}


def test_a_new_commit_adds_a_patch_and_a_dropped_one_is_removed(toy, tmp_path):
    repo, patches = toy
    wt = _checkout(repo, patches, tmp_path).worktree
    _git(wt, "rebase", "-q", "--onto", "HEAD~2", "HEAD~1")       # drop "toy: one"
    _commit(wt, "toy: three\n\nA new change.", 3, **{"c.c": "int c = 3;\n"})
    done = gitseries.export(wt, "b4/ovl-volatile-toy", patches)
    names = [p.name for p in parse_series(patches / "series").patches]
    assert names == ["0001-toy-two.patch", "0002-toy-three.patch"]
    assert (patches / "series").read_text().startswith("# the toy series\n")
    assert "0001-toy-one.patch" in done.removed and not (patches / "0001-toy-one.patch").exists()
    assert not (patches / "0002-toy-two.patch").exists()
    assert (patches / "0000-cover-letter.patch").exists()


def test_an_existing_branch_is_refused_then_replaced_with_force(toy, tmp_path):
    repo, patches = toy
    wt = _checkout(repo, patches, tmp_path).worktree
    (wt / "a.c").write_text("work in the series worktree\n")
    with pytest.raises(errors.SeriesBranchExists, match="--force"):
        _checkout(repo, patches, tmp_path)
    assert (wt / "a.c").read_text() == "work in the series worktree\n"
    done = _checkout(repo, patches, tmp_path, force=True)
    assert (done.worktree / "a.c").read_text() == "int a = 1;\n"


def test_a_series_that_does_not_apply_leaves_nothing_behind(toy, tmp_path):
    repo, patches = toy
    _git(repo, "stash", "-q", "-u")
    _commit(repo, "upstream rewrites b.c", 5, **{"b.c": "long b;\n"})
    _git(repo, "tag", "v1.1")
    _git(repo, "stash", "pop", "-q")
    before = gitseries.user_state(repo)
    with pytest.raises(errors.GitAmFailed, match="0002-toy-two.patch"):
        gitseries.checkout(repo, tmp_path / "wt", parse_series(patches / "series"),
                           (patches / "0000-cover-letter.patch").read_text(), "toy", "v1.1")
    assert gitseries.user_state(repo) == before
    assert "ovl-volatile" not in _git(repo, "branch", "--list") and not (tmp_path / "wt").exists()
    assert _git(repo, "worktree", "list").count("\n") == 1


def test_export_refuses_a_branch_without_cover_commit(toy, tmp_path):
    repo, patches = toy
    _git(repo, "branch", "b4/ovl-volatile-toy", "v1.0")
    with pytest.raises(errors.SeriesBranchMissing, match="no cover-letter commit"):
        gitseries.export(repo, "b4/ovl-volatile-toy", patches)
    with pytest.raises(errors.SeriesBranchMissing, match="no branch"):
        gitseries.export(repo, "b4/nothing", patches)


def test_no_identity_is_a_one_line_error(toy, tmp_path, monkeypatch):
    repo, patches = toy
    _git(repo, "config", "--unset", "user.name")
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.gitconfig identity either
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    with pytest.raises(errors.GitIdentityMissing, match="user.name"):
        _checkout(repo, patches, tmp_path)


@pytest.mark.skipif(shutil.which("b4") is None, reason="b4 is not installed (apt-get install b4)")
def test_b4_prep_understands_the_branch(toy, tmp_path):
    repo, patches = toy
    wt = _checkout(repo, patches, tmp_path).worktree
    info = subprocess.run(["b4", "prep", "--show-info"], cwd=wt, capture_output=True, text=True,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert info.returncode == 0, info.stderr
    assert "change-id" in info.stdout and "toy: reusable things" in info.stdout
    out = tmp_path / "b4-out"
    res = subprocess.run(["b4", "prep", "-p", str(out)], cwd=wt, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    made = sorted(p.name for p in out.iterdir())
    assert len(made) == 3, made                          # the cover letter and the two patches
    assert "v3" in (out / made[0]).read_text().split("\n\n", 1)[0]


def test_essence_ignores_only_ids_and_signature():
    a = "From " + "1" * 40 + " Mon Sep 17 00:00:00 2001\nSubject: x\n\nindex 1234567..89abcde 100644\n+a\n-- \n2.39.5\n"
    b = "From " + "2" * 40 + " Mon Sep 17 00:00:00 2001\nSubject: x\n\nindex 123456789abc..89abcdef0123 100644\n+a\n-- \n2.47.0\n"
    assert gitseries.essence(a) == gitseries.essence(b)
    assert gitseries.essence(a) != gitseries.essence(a.replace("+a", "+b"))
    assert json.dumps(gitseries.parse_cover("t\n\n" + gitseries.MARKER + "\n# n\n{\"x\": 1}\n")[1]) == '{"x": 1}'


# A hunk of patches/7.2/0001 as stored (default diff driver: the label `retry:`) and as
# `git format-patch` writes it in a kernel clone, whose .gitattributes says `*.[ch] diff=cpp`.
_HUNK_STORED = """\
From 1111111111111111111111111111111111111111 Mon Sep 17 00:00:00 2001
Subject: [PATCH 1/4] fs: add s_instance_id to struct super_block

@@ -1,2 +1,2 @@ retry: is what the message says, not a hunk
---
diff --git a/fs/super.c b/fs/super.c
index 1234567..89abcde 100644
--- a/fs/super.c
+++ b/fs/super.c
@@ -773,6 +775,7 @@ retry:
 	s->s_type = fc->fs_type;
 	s->s_iflags |= fc->s_iflags;
 	strscpy(s->s_id, s->s_type->name, sizeof(s->s_id));
+	s->s_instance_id = ++sb_instance_id_last;
 	list_add_tail(&s->s_list, &super_blocks);
 	hlist_add_head(&s->s_instances, &s->s_type->fs_supers);
 	spin_unlock(&sb_lock);
@@ -790,2 +793,2 @@
-a
+b
"""


def test_essence_ignores_the_function_context_of_hunk_headers():
    cpp = _HUNK_STORED.replace("@@ -773,6 +775,7 @@ retry:",
                               "@@ -773,6 +775,7 @@ struct super_block *sget_fc(struct fs_context *fc,")
    assert cpp != _HUNK_STORED
    assert gitseries.essence(cpp) == gitseries.essence(_HUNK_STORED)
    assert gitseries.essence(_HUNK_STORED.replace("@@ -790,2 +793,2 @@\n", "@@ -790,2 +793,2 @@ out:\n")) \
        == gitseries.essence(_HUNK_STORED)


@pytest.mark.parametrize("change", [
    ("@@ -773,6 +775,7 @@ retry:", "@@ -774,6 +776,7 @@ retry:"),               # the hunk moved
    ("@@ -773,6 +775,7 @@ retry:", "@@ -773,6 +775,7 @@retry:"),               # not a header any more
    ("+\ts->s_instance_id = ++sb_instance_id_last;", "+\ts->s_instance_id = sb_instance_id_last++;"),
    (" \ts->s_type = fc->fs_type;", " \ts->s_type = fc->fs_type; "),            # a context line
    ("@@ -1,2 +1,2 @@ retry: is what", "@@ -1,2 +1,2 @@ out: is what"),       # the message, before the diff
])
def test_essence_still_sees_every_real_change_of_a_hunk(change):
    old, new = change
    assert old in _HUNK_STORED
    assert gitseries.essence(_HUNK_STORED.replace(old, new)) != gitseries.essence(_HUNK_STORED)


def test_export_keeps_a_patch_whose_hunk_headers_name_other_functions(toy, tmp_path):
    repo, patches = toy
    # the stored patch was written with another diff driver: same hunk, other function name
    first = sorted(patches.glob("0001-*.patch"))[0]
    first.write_text(first.read_text().replace("@@ -1 +1 @@\n", "@@ -1 +1 @@ int a;\n"))
    assert "@@ -1 +1 @@ int a;\n" in first.read_text()
    before = _snapshot(patches)
    _checkout(repo, patches, tmp_path)
    done = gitseries.export(repo, "b4/ovl-volatile-toy", patches)
    assert not done.changed and first.name in done.kept
    assert _snapshot(patches) == before
