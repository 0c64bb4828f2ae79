"""The series as a git branch: ``git am`` it into a linked worktree, and back.

Kernel developers work on a branch (rebase, amend, ``b4 prep``, ``b4 send``),
not on ``.patch`` files.  :func:`checkout` makes that branch in a *linked
worktree* of the user's clone (``git worktree add -b``), so the user's own
checkout, HEAD, index and uncommitted edits are never touched: branch
``b4/ovl-volatile-<base>`` at the base commit, then an empty cover-letter
commit in the form ``b4 prep`` keeps it with its "commit" cover strategy (the
cover text, the ``--- b4-submit-tracking ---`` marker and b4's tracking JSON),
then every patch by ``git am`` (author, author date and message kept).

:func:`export` is the way back: ``git format-patch`` of the commits after the
cover commit into ``patches/<base>/`` and its ``series`` file.  It is
deterministic: a file whose patch did not change (same headers, author date,
message and hunks; only the commit id on its first line, the abbreviated
``index`` ids, the function names git writes after a hunk's ``@@ ... @@`` (they
depend on the clone's ``.gitattributes``) or the git version in the signature
differ) is kept byte for
byte, so an untouched round trip changes nothing, and a rebase does not churn
every file.
"""

from __future__ import annotations

import datetime
import email
import email.utils
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vm import errors, runner
from vm.kernel.patch import Series

#: what b4 looks for (``git log --grep``) to find the cover commit of a prep branch
MARKER = "--- b4-submit-tracking ---"
TRACKING_NOTE = "# This section is used internally by b4 prep for tracking purposes."
#: our own key in b4's tracking JSON (b4 keeps keys it does not know when it rewrites the cover)
HARNESS_KEY = "ovl-volatile-harness"
BRANCH_PREFIX = "b4/ovl-volatile-"
#: the user's format.* and diff.* settings must not change what lands in patches/
FORMAT_PATCH = ("-c", "format.useAutoBase=false", "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false",
                "-c", "diff.algorithm=default", "-c", "diff.relative=false", "-c", "format.suffix=.patch",
                "format-patch", "--numbered", "--no-cover-letter", "--no-thread", "--no-signoff",
                "--no-to", "--no-cc", "--no-add-header", "--subject-prefix=PATCH", "--no-notes",
                "--no-color", "--no-base")


def branch_for(base: str) -> str:
    return f"{BRANCH_PREFIX}{base}"


def git(repo: Path, *args: str, check: bool = True, quiet: bool = True, input: str | None = None) -> runner.Result:
    return runner.run(["git", "-C", repo, *args], check=check, quiet=quiet, input=input)


def toplevel(tree: Path, fix: str = "pass the top of your kernel clone (e.g. of the stable tree)") -> Path:
    """The top of the git work tree ``tree`` is in (shared with :mod:`vm.bisect`)."""
    res = runner.run(["git", "-C", tree, "rev-parse", "--show-toplevel"], check=False, quiet=True)
    if not tree.is_dir() or not res.ok:
        raise errors.BadArgument(what=f"--tree {tree} is not a git work tree", fix=fix)
    return Path(res.stdout.strip())


def resolve(repo: Path, ref: str, what: str) -> str:
    res = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if not res.ok:
        raise errors.BadArgument(what=f"{what} {ref!r} is not a commit in {repo}",
                                 fix="pass a commit, tag or branch that exists there (`git fetch` it first)")
    return res.stdout.strip()


def identity(repo: Path) -> str:
    """``Name <email>`` of git's ``user.name`` and ``user.email`` in ``repo``, or a one-line error."""
    parts = []
    for key in ("user.name", "user.email"):
        value = git(repo, "config", key, check=False).stdout.strip()
        if not value:
            raise errors.GitIdentityMissing(what=key, repo=repo)
        parts.append(value)
    return f"{parts[0]} <{parts[1]}>"


# --- the user's checkout is never touched -------------------------------------------

@dataclass(frozen=True)
class UserState:
    head: str
    branch: str
    status: str


def user_state(repo: Path) -> UserState:
    return UserState(head=git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False).stdout.strip(),
                     branch=git(repo, "symbolic-ref", "-q", "HEAD", check=False).stdout.strip() or "(detached)",
                     status=git(repo, "status", "--porcelain=v1", "--untracked-files=all",
                                "--ignore-submodules").stdout)


def check_untouched(repo: Path, before: UserState) -> None:
    after = user_state(repo)
    changed = [name for name in ("head", "branch", "status") if getattr(before, name) != getattr(after, name)]
    if changed:
        raise errors.UserTreeChanged(repo=repo, what=", ".join(changed))


def worktrees(repo: Path) -> dict[str, Path]:
    """``refs/heads/<branch>`` -> the worktree that has it checked out."""
    found, path = {}, None
    for line in git(repo, "worktree", "list", "--porcelain").stdout.splitlines():
        if line.startswith("worktree "):
            path = Path(line[len("worktree "):])
        elif line.startswith("branch ") and path is not None:
            found[line[len("branch "):]] = path
    return found


# --- the cover-letter commit (b4 prep, "commit" strategy) ---------------------------

def cover_message(cover_letter: str, base: str) -> str:
    """The cover commit's message from the rendered ``0000-cover-letter.patch``: the
    title, the body, its ``Cc:`` as trailers (b4 sends to them), b4's tracking JSON."""
    msg = email.message_from_string(cover_letter)
    subject = " ".join(str(msg.get("Subject", "")).split())
    m = re.match(r"\[PATCH(?:\s+v(\d+))?[^\]]*\]\s*(.*)", subject)
    revision, title = (int(m.group(1) or 1), m.group(2)) if m else (1, subject)
    body = str(msg.get_payload()).strip("\n")
    cc = [email.utils.formataddr(pair) for pair in email.utils.getaddresses(msg.get_all("Cc", []))]
    text = f"{title}\n\n{body}\n" + ("\n" + "".join(f"Cc: {a}\n" for a in cc) if cc else "")
    slug = re.sub(r"\W+", "-", f"ovl-volatile-{base}").strip("-").lower()
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    tracking = {"series": {"revision": revision,
                           "change-id": f"{today}-{slug}-{hashlib.sha256(title.encode()).hexdigest()[:12]}",
                           "base-branch": None, "prefixes": []},
                HARNESS_KEY: {"base": base, "cover-sha256": _digest(text)}}
    return f"{text}\n{MARKER}\n{TRACKING_NOTE}\n{json.dumps(tracking, indent=2)}\n"


def _digest(cover_text: str) -> str:
    return hashlib.sha256(cover_text.strip().encode()).hexdigest()


def parse_cover(message: str) -> tuple[str, dict]:
    """(cover text, tracking data) of a cover commit's message, as b4 reads it."""
    cover, _, magic = message.partition(MARKER)
    _, brace, rest = magic.partition("{")
    try:
        tracking = json.loads(brace + rest) if brace else {}
    except json.JSONDecodeError:
        tracking = {}
    return cover.strip(), tracking


# --- checkout ---------------------------------------------------------------------

@dataclass(frozen=True)
class Checkout:
    repo: Path
    worktree: Path
    branch: str
    onto: str            # the base commit
    cover: str           # the cover-letter commit
    head: str
    patches: int


def checkout(tree: Path, worktree: Path, series: Series, cover_letter: str, base: str, onto: str,
             *, force: bool = False) -> Checkout:
    """Branch ``b4/ovl-volatile-<base>`` in a new linked worktree: ``onto``, the cover
    commit, the series by ``git am``.  On any failure nothing is left behind."""
    repo = toplevel(tree)
    onto_sha = resolve(repo, onto, "--onto")
    identity(repo)
    branch = branch_for(base)
    before = user_state(repo)
    try:
        _make_room(repo, branch, worktree, force)
        worktree.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "add", "-q", "-b", branch, str(worktree), onto_sha, quiet=False)
        try:
            git(worktree, "commit", "-q", "--allow-empty", "-F", "-", input=cover_message(cover_letter, base))
            cover = git(worktree, "rev-parse", "HEAD").stdout.strip()
            git(repo, "config", f"branch.{branch}.b4-prep-cover-strategy", "commit")
            _am(worktree, series, onto, cover)
        except BaseException:
            _drop(repo, branch, worktree)
            raise
    finally:
        check_untouched(repo, before)
    head = git(worktree, "rev-parse", "HEAD").stdout.strip()
    return Checkout(repo, worktree, branch, onto_sha, cover, head, len(series))


def _make_room(repo: Path, branch: str, worktree: Path, force: bool) -> None:
    """Refuse (or with ``force`` remove) an existing branch of that name and its worktree."""
    git(repo, "worktree", "prune", check=False)
    where = worktrees(repo).get(f"refs/heads/{branch}")
    exists = git(repo, "show-ref", "--verify", "--quiet", f"refs/heads/{branch}", check=False).ok
    if where is not None and where.resolve() == repo.resolve():
        raise errors.SeriesBranchExists(branch=branch, repo=repo, where=" (it is your checkout: never removed)")
    if exists and not force:
        raise errors.SeriesBranchExists(branch=branch, repo=repo,
                                        where=f", checked out in {where}" if where else "")
    if exists:
        _drop(repo, branch, where)
    if worktree.exists() and any(worktree.iterdir()):
        raise errors.BadArgument(what=f"worktree directory {worktree} exists and is not empty",
                                 fix="remove it, or pass another --worktree")


def _drop(repo: Path, branch: str, worktree: Path | None) -> None:
    if worktree is not None and (worktree / ".git").exists():
        git(repo, "worktree", "remove", "--force", str(worktree), check=False)
    git(repo, "worktree", "prune", check=False)
    git(repo, "branch", "-D", branch, check=False)


def _am(worktree: Path, series: Series, onto: str, cover: str) -> None:
    res = runner.run(["git", "-C", worktree, "am", "--quiet", *[str(p.path.resolve()) for p in series.patches]],
                     check=False)
    if res.ok:
        return
    applied = int(git(worktree, "rev-list", "--count", f"{cover}..HEAD").stdout.strip() or 0)
    git(worktree, "am", "--abort", check=False)
    failing = series.patches[min(applied, len(series) - 1)].name
    raise errors.GitAmFailed(patch=failing, onto=onto, detail=runner.tail(res.stdout + res.stderr, 2))


# --- export -----------------------------------------------------------------------

@dataclass(frozen=True)
class BranchSeries:
    repo: Path
    branch: str
    tip: str
    base_commit: str
    cover: str
    commits: tuple[str, ...]
    cover_text: str
    tracking: dict

    @property
    def cover_edited(self) -> bool:
        """The cover commit's text is not what `invoke series checkout` put there."""
        recorded = self.tracking.get(HARNESS_KEY, {}).get("cover-sha256")
        return bool(recorded) and recorded != _digest(self.cover_text)


def find_series(tree: Path, branch: str) -> BranchSeries:
    """The commits of a series branch: after its cover commit, up to the branch tip."""
    repo = toplevel(tree)
    tip = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", check=False)
    if not tip.ok:
        raise errors.SeriesBranchMissing(what=f"no branch {branch}", repo=repo,
                                         fix="make it with `invoke series checkout`, or name it with --branch")
    sha = tip.stdout.strip()
    cover = git(repo, "log", "-F", f"--grep={MARKER}", "--format=%H", "-n", "1", sha).stdout.strip()
    if not cover:
        raise errors.SeriesBranchMissing(what=f"{branch} has no cover-letter commit ({MARKER})", repo=repo,
                                         fix="make the branch with `invoke series checkout` (or `b4 prep`)")
    merges = git(repo, "rev-list", "--merges", f"{cover}..{sha}").stdout.split()
    if merges:
        raise errors.SeriesBranchMissing(what=f"{branch} has merge commits after its cover letter "
                                              f"({merges[0][:12]})", repo=repo, fix="rebase it into a linear series")
    commits = tuple(git(repo, "rev-list", "--reverse", f"{cover}..{sha}").stdout.split())
    text, tracking = parse_cover(git(repo, "show", "-s", "--format=%B", cover).stdout)
    base_commit = git(repo, "rev-parse", f"{cover}^").stdout.strip()
    return BranchSeries(repo, branch, sha, base_commit, cover, commits, text, tracking)


@dataclass(frozen=True)
class Exported:
    series: BranchSeries
    written: tuple[str, ...]      # new or changed patch files
    kept: tuple[str, ...]         # unchanged: left byte for byte
    removed: tuple[str, ...]      # listed before, no longer in the series
    series_file_changed: bool

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed or self.series_file_changed)


def export(tree: Path, branch: str, dest: Path) -> Exported:
    """``git format-patch`` of the branch into ``dest`` (``patches/<base>/``) and its ``series``."""
    found = find_series(tree, branch)
    if not found.commits:
        raise errors.SeriesBranchMissing(what=f"{branch} has no commit after its cover letter", repo=found.repo,
                                         fix="commit the series on it (git am, git commit) before exporting")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest))
    try:
        git(found.repo, *FORMAT_PATCH, "-o", str(tmp), f"{found.cover}..{found.tip}", quiet=False)
        names = [p.name for p in sorted(tmp.glob("*.patch"))]
        written, kept = _install(tmp, dest, names)
        removed, series_changed = _write_series(dest, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(found, tuple(written), tuple(kept), tuple(removed), series_changed)


_INDEX = re.compile(r"^index [0-9a-f]+\.\.[0-9a-f]+( [0-7]+)?$")
_FROM_LINE = re.compile(r"^From [0-9a-f]{40} Mon Sep 17 00:00:00 2001$")
#: a hunk header: its ranges (kept) and the function-context text git writes after them (dropped)
_HUNK = re.compile(r"^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@)(?: .*)?$")


def essence(text: str) -> str:
    """What makes a patch: without the commit id line, the ``index`` lines, the signature
    and the function context of the hunk headers.

    That context (``@@ -773,6 +775,7 @@ retry:``) is a hint for the reader that ``git
    apply`` ignores, and git writes it from the file's diff driver: in a kernel clone
    ``.gitattributes`` says ``*.[ch] diff=cpp`` (``sget_fc(...)`` instead of ``retry:``),
    elsewhere the default.  The ranges, and every line of every hunk, still count."""
    lines = text.splitlines()
    if lines and _FROM_LINE.match(lines[0]):
        lines = lines[1:]
    tail = [i for i, line in enumerate(lines) if line == "-- "]
    if tail and len(lines) - tail[-1] <= 3:
        lines = lines[:tail[-1]]
    out, in_diff = [], False
    for line in lines:
        in_diff = in_diff or line.startswith("diff --git ")
        if _INDEX.match(line):
            continue
        hunk = _HUNK.match(line) if in_diff else None
        out.append(hunk.group(1) if hunk else line)
    return "\n".join(out)


def _install(tmp: Path, dest: Path, names: list[str]) -> tuple[list[str], list[str]]:
    written, kept = [], []
    for name in names:
        new, old = tmp / name, dest / name
        if old.is_file() and essence(old.read_text(errors="replace")) == essence(new.read_text(errors="replace")):
            kept.append(name)
            continue
        new.replace(old)
        written.append(name)
    return written, kept


def _write_series(dest: Path, names: list[str]) -> tuple[list[str], bool]:
    """The ``series`` file: its leading comment lines kept, the patch names replaced.
    Patch files the old series listed and the new one does not are removed."""
    path = dest / "series"
    old_text = path.read_text() if path.is_file() else ""
    old_lines = old_text.splitlines()
    header = []
    for line in old_lines:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        header.append(line)
    listed = [line.split("#", 1)[0].split()[0] for line in old_lines[len(header):]
              if line.split("#", 1)[0].strip()]
    removed = [n for n in listed if n not in names and "/" not in n]
    for name in removed:
        (dest / name).unlink(missing_ok=True)
    text = "\n".join(header + names) + "\n"
    if text != old_text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return removed, text != old_text
