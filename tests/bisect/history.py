"""A small, real kernel git history to bisect, made from a pristine tree.

An import commit of the tree, then five commits touching ``fs/overlayfs``:

====  ===========================================  ==================================
c1    harmless change in copy_up.c                 good
c2    rewords a comment line patch 3 replaces      the series stops applying: skip
c3    reverts c2                                   good
c4    ``volatile`` silently falls back to          bad: volatile-to-volatile loses
      fsync=auto                                   its dirty file (no volatile mount)
c5    harmless change in namei.c                   bad (inherits c4)
====  ===========================================  ==================================

With good = import and bad = c5, ``git bisect`` tests c2 (skipped), c3
(good), c4 (bad), so the run must name c4 and record the skip of c2.  The
commits are made with fixed author, committer and dates, so their ids are
the same on every machine for the same tree.  The repository is cached per
tree and made atomically (built under a temporary name, then renamed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edit:
    subject: str
    path: str
    old: str
    new: str
    role: str          # harmless | series-stops-applying | breaks-volatile-reuse

    def apply(self, repo: Path) -> None:
        f = repo / self.path
        text = f.read_text()
        if self.old not in text:
            raise RuntimeError(f"{self.path} does not contain {self.old!r}: not the tree this history expects")
        f.write_text(text.replace(self.old, self.new, 1))


_REWORDED = "\t * we error out about incompat features and fail the mount."
_ORIGINAL = "\t * we will error about incompat features and fail the mount."

EDITS = (
    Edit("ovl: note why copy up needs no fsync for volatile mounts", "fs/overlayfs/copy_up.c",
         "int ovl_copy_up(struct dentry *dentry)\n",
         "/* No fsync of the copy for volatile mounts: see ovl_should_sync(). */\n"
         "int ovl_copy_up(struct dentry *dentry)\n", "harmless"),
    Edit("ovl: reword the incompat dir comment", "fs/overlayfs/readdir.c",
         _ORIGINAL, _REWORDED, "series-stops-applying"),
    Edit('Revert "ovl: reword the incompat dir comment"', "fs/overlayfs/readdir.c",
         _REWORDED, _ORIGINAL, "harmless"),
    Edit("ovl: treat volatile as fsync=auto", "fs/overlayfs/params.c",
         "\tcase Opt_volatile:\n\t\tconfig->fsync_mode = OVL_FSYNC_VOLATILE;\n",
         "\tcase Opt_volatile:\n\t\tconfig->fsync_mode = OVL_FSYNC_AUTO;\n", "breaks-volatile-reuse"),
    Edit("ovl: document the positive return of ovl_lookup_positive_unlocked", "fs/overlayfs/namei.c",
         "\treturn positive;\n}\n", "\treturn positive;\t/* 1 if positive, 0 if not */\n}\n", "harmless"),
)

_ENV = {"GIT_AUTHOR_NAME": "ovl-volatile-harness", "GIT_AUTHOR_EMAIL": "harness@example.invalid",
        "GIT_COMMITTER_NAME": "ovl-volatile-harness", "GIT_COMMITTER_EMAIL": "harness@example.invalid"}


@dataclass(frozen=True)
class History:
    repo: Path
    base: str                  # the import commit
    commits: tuple[str, ...]   # c1..c5, in EDITS order

    def role(self, commit: str) -> str:
        return EDITS[self.commits.index(commit)].role

    def first(self, role: str) -> str:
        return next(c for c, e in zip(self.commits, EDITS) if e.role == role)


def _git(repo: Path, *args: str, when: int = 0) -> str:
    env = dict(os.environ, **_ENV, GIT_AUTHOR_DATE=f"@{1700000000 + when} +0000",
               GIT_COMMITTER_DATE=f"@{1700000000 + when} +0000")
    return subprocess.run(["git", "-C", str(repo), "-c", "core.compression=1", "-c", "commit.gpgsign=false",
                           *args], env=env, check=True, capture_output=True, text=True).stdout.strip()


def make_history(pristine: Path, dest: Path, edits: tuple[Edit, ...] = EDITS) -> History:
    """The repository at ``dest`` (made from ``pristine`` if it does not exist yet): the import
    commit, then ``edits`` (none: the import commit alone, e.g. for the series round trip)."""
    if not (dest / ".git").is_dir():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--", str(pristine), str(tmp)], check=True)
        _git(tmp, "init", "-q", "-b", "master")
        _git(tmp, "add", "-A", "-f", ".")
        _git(tmp, "commit", "-q", "-m", f"Import {pristine.name}", when=0)
        for n, edit in enumerate(edits, 1):
            edit.apply(tmp)
            _git(tmp, "commit", "-q", "-a", "-m", edit.subject, when=n)
        tmp.rename(dest)
    shas = _git(dest, "rev-list", "--reverse", "master").split()
    if len(shas) != len(edits) + 1:
        raise RuntimeError(f"{dest} is not the expected history ({len(shas)} commits); remove it")
    return History(dest, shas[0], tuple(shas[1:]))
