"""Quilt-style series files and applying them onto a copy of a pristine tree.

``patches/<base>/series`` lists ``git format-patch`` files in order, one per
line; ``#`` starts a comment and an optional ``-pN`` follows the name (quilt
syntax).  A series is applied onto a hard-linked copy of the pristine tree
(GNU patch replaces files by rename, so the pristine tree is never touched),
and the copy only appears under its final name once every patch applied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vm import errors, runner


@dataclass(frozen=True)
class Patch:
    path: Path
    strip: int = 1

    @property
    def name(self) -> str:
        return self.path.name

    def subject(self) -> str:
        """The commit subject without the ``[PATCH n/m]`` prefix."""
        lines = self.path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Subject:"):
                subject = line[len("Subject:"):].strip()
                for cont in lines[i + 1:]:
                    if not cont.startswith((" ", "\t")):
                        break
                    subject += " " + cont.strip()
                return re.sub(r"^\[PATCH[^\]]*\]\s*", "", subject)
        return self.path.stem


@dataclass(frozen=True)
class Series:
    path: Path
    patches: tuple[Patch, ...]

    def prefix(self, count: int) -> "Series":
        if not 0 <= count <= len(self.patches):
            raise errors.BadArgument(what=f"series {self.path} has {len(self.patches)} patches, not {count}",
                                     fix=f"pick a prefix between 0 and {len(self.patches)}")
        return Series(self.path, self.patches[:count])

    def fingerprint(self) -> str:
        """Depends on the patch contents and order, not on file names or mtimes."""
        h = hashlib.sha256()
        for patch in self.patches:
            h.update(f"-p{patch.strip}\0".encode())
            h.update(patch.path.read_bytes())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.patches)


def parse_series(path: Path) -> Series:
    if not path.is_file():
        raise errors.SeriesError(series=path, reason="no such series file",
                                 fix="create it listing the patch files in order, one per line")
    patches = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *opts = line.split()
        strip = 1
        for opt in opts:
            if m := re.fullmatch(r"-p(\d+)", opt):
                strip = int(m.group(1))
            else:
                raise errors.SeriesError(series=f"{path}:{number}", reason=f"unknown option {opt!r}",
                                         fix="only '-pN' may follow a patch name")
        patch_path = path.parent / name
        if not patch_path.is_file():
            raise errors.SeriesError(series=f"{path}:{number}", reason=f"patch {name} does not exist",
                                     fix=f"add {patch_path} or remove the line")
        patches.append(Patch(patch_path, strip))
    return Series(path, tuple(patches))


_FILE = re.compile(r"^(?:patching|checking) file '?(.+?)'?$")
_HUNK = re.compile(r"^Hunk #(\d+) FAILED at (\d+)")


def describe_failure(output: str) -> str:
    """Turn GNU patch output into 'file F: hunk #N FAILED at L, ...'."""
    current = "?"
    failures: list[str] = []
    for line in output.splitlines():
        if m := _FILE.match(line.strip()):
            current = m.group(1)
        elif m := _HUNK.match(line.strip()):
            failures.append(f"{current} hunk #{m.group(1)} (at line {m.group(2)})")
        elif "can't find file to patch" in line:
            failures.append("a file it patches does not exist")
        elif "Reversed (or previously applied) patch detected" in line:
            failures.append(f"{current} already contains this change")
        elif "malformed patch" in line or "Only garbage was found" in line:
            failures.append(f"the patch file is malformed ({line.strip()})")
    if not failures:
        return runner.tail(output, 2) or "patch failed"
    return "failed: " + ", ".join(dict.fromkeys(failures))


def apply_patch(patch: Patch, tree: Path) -> None:
    res = runner.run(["patch", f"-p{patch.strip}", "--batch", "--forward", "--no-backup-if-mismatch",
                      "--reject-file=-", "-d", tree, "-i", patch.path.resolve()],
                     check=False, quiet=True)
    if not res.ok:
        raise errors.PatchDoesNotApply(patch=patch.path, tree="the base tree",
                                       detail=describe_failure(res.stdout + res.stderr))


def copy_tree(src: Path, dest: Path) -> None:
    """Hard-linked copy (fast, shares no writes: patch and kbuild replace files)."""
    runner.run(["cp", "-al", "--", src, dest], quiet=True)


def prepare_source(pristine: Path, series: Series, dest: Path) -> Path:
    """Make ``dest`` a copy of ``pristine`` with ``series`` applied, atomically.

    If ``dest`` exists it was completed earlier and is reused.  On any failure
    the temporary copy is removed, so nothing half-patched remains.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-src-", dir=dest.parent))
    try:
        work = tmp / "src"
        copy_tree(pristine, work)
        for patch in series.patches:
            runner.echo(f"  applying {patch.name}")
            apply_patch(patch, work)
        os.rename(work, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def remove_stale_temps(parent: Path) -> None:
    if parent.is_dir():
        for entry in parent.glob(".tmp-*"):
            shutil.rmtree(entry, ignore_errors=True)
