"""``invoke test --source tree:DIR`` on a work tree of a series branch.

When ``DIR`` is the top of a git work tree whose checked-out branch is a series
branch (``invoke series checkout``: a cover-letter commit with b4's tracking
marker, made by this harness or named ``b4/ovl-volatile-*``), ``patches/`` is
not applied again: the work tree as it is (uncommitted edits included) is P,
and the base commit (the parent of the cover commit) is B.  B is checked out in
a cache worktree of the same clone (``git worktree add --detach``; the user's
checkouts are never touched), and both are built incrementally in kept ``O=``
dirs under ``<cache>/devloop/<repo key>-<base>/``::

    baseline/src   B's worktree (detached at the base commit)
    baseline/obj   B's O= dir          baseline/out  B's bzImage, modules image
    patched/src    the series worktree ``invoke series checkout`` makes by default
    patched/obj    P's O= dir          patched/out   P's bzImage, modules image

``src`` and ``obj`` sit side by side like every build under ``builds/``: ccache
(``base_dir`` = the cache) rewrites the compiler's paths relative to ``obj``, so
both hit on the objects ``invoke build`` compiled for the same sources.  (A
series worktree elsewhere is built in ``patched/obj`` too, without those hits:
its first build compiles everything.)  The kernels carry the labels
``devloop-baseline-<clone>-<base>`` and ``devloop-patched-<clone>-<base>`` (``<clone>``:
the first 6 digits of the repo key), so their guests never clash with ``invoke boot
--detach`` guests nor with the loop of another clone or base (a detached boot, and a
session finding an idle guest of its label on another build, stop that guest), and
are judged as ``baseline`` and ``patched`` against the base's expectations.  Any
other ``tree:`` keeps its meaning: a kernel tree that ``patches/<base>/`` is applied to.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vm import errors, pipeline, runner
from vm.kernel import build, gitseries, incremental
from vm.kernel.fetch import read_version
from vm.settings import Settings

BASELINE_LABEL = "devloop-baseline"
PATCHED_LABEL = "devloop-patched"


@dataclass(frozen=True)
class SeriesTree:
    """A work tree with a series branch checked out."""

    worktree: Path       # the top of the work tree (P, as it is)
    repo_key: str        # one per clone (its common git dir), shared by all its worktrees
    branch: str
    base: str | None     # the base the harness recorded in the cover commit, if any
    base_commit: str     # the cover commit's parent (B)
    cover: str
    head: str


def tree_of(source: str | None) -> Path | None:
    """``tree:DIR`` -> DIR; anything else -> None."""
    if not source or not source.startswith("tree:"):
        return None
    return Path(source[len("tree:"):]).expanduser().resolve()


def _git(tree: Path, *args: str) -> runner.Result:
    return runner.run(["git", "-C", tree, *args], check=False, quiet=True)


def repo_key(tree: Path) -> str:
    """One key per clone: its common git dir, shared by all its worktrees."""
    common = Path(_git(tree, "rev-parse", "--git-common-dir").stdout.strip())
    common = (common if common.is_absolute() else tree / common).resolve()
    return hashlib.sha256(str(common).encode()).hexdigest()[:12]


def devloop_root(settings: Settings, key: str) -> Path:
    return settings.sub("devloop") / f"{key}-{settings.base}"


def detect(tree: Path) -> SeriesTree | None:
    """The series branch ``tree`` has checked out, or None: not the top of a git work
    tree, a detached HEAD, or a branch without a series cover-letter commit."""
    tree = tree.expanduser().resolve()
    if not tree.is_dir():
        return None
    top = _git(tree, "rev-parse", "--show-toplevel")
    if not top.ok or Path(top.stdout.strip()).resolve() != tree:
        return None           # not git, or a plain tree inside some other repository
    ref = _git(tree, "symbolic-ref", "-q", "HEAD")
    if not ref.ok or not ref.stdout.strip().startswith("refs/heads/"):
        return None
    branch = ref.stdout.strip()[len("refs/heads/"):]
    try:
        found = gitseries.find_series(tree, branch)
    except errors.SeriesBranchMissing:
        return None
    ours = found.tracking.get(gitseries.HARNESS_KEY)
    if not isinstance(ours, dict) and not branch.startswith(gitseries.BRANCH_PREFIX):
        return None           # some other b4 prep branch
    base = ours.get("base") if isinstance(ours, dict) else None
    return SeriesTree(worktree=tree, repo_key=repo_key(tree),
                      branch=branch, base=str(base) if base else None, base_commit=found.base_commit,
                      cover=found.cover, head=found.tip)


@dataclass(frozen=True)
class DevBuild:
    label: str           # the kernel's label (build.json, run dirs): devloop-patched-<clone>-<base>, ...
    judged_as: str       # the scenario variant whose expectations apply: baseline / patched
    src: Path
    obj: Path
    kdir: Path           # out/ (the packaged kernel) lives here
    commit: str | None   # B: the commit checked out in src; P: None (the work tree as it is)

    @property
    def key(self) -> str:
        return self.commit[:12] if self.commit else "worktree"


@dataclass(frozen=True)
class TreePlan:
    tree: SeriesTree
    root: Path
    baseline: DevBuild
    patched: DevBuild


def plan(settings: Settings, found: SeriesTree) -> TreePlan:
    """Where B and P are checked out and built; refuses a branch of another base."""
    if found.base and found.base != settings.base:
        raise errors.BadArgument(what=f"{found.worktree} is on {found.branch}, the {found.base} series "
                                      f"(this run is for base {settings.base})",
                                 fix=f"pass --base {found.base}")
    root = devloop_root(settings, found.repo_key)
    b, p = root / "baseline", root / "patched"
    mine = f"{found.repo_key[:6]}-{settings.base}"
    return TreePlan(tree=found, root=root,
                    baseline=DevBuild(f"{BASELINE_LABEL}-{mine}", pipeline.BASELINE, b / "src", b / "obj", b,
                                      found.base_commit),
                    patched=DevBuild(f"{PATCHED_LABEL}-{mine}", pipeline.PATCHED, found.worktree, p / "obj",
                                     p, None))


def checkout_baseline(found: SeriesTree, item: DevBuild) -> None:
    """``item.src`` as a detached worktree of the clone at ``item.commit``.  An existing one
    is moved there (git rewrites only the files that differ, so the kept O= dir rebuilds
    only what they affect); the user's worktrees are never touched."""
    assert item.commit is not None
    src = item.src
    if (src / ".git").is_file() and _git(src, "rev-parse", "--show-toplevel").ok:
        if _git(src, "rev-parse", "HEAD").stdout.strip() == item.commit and \
                not _git(src, "status", "--porcelain", "--untracked-files=no").stdout.strip():
            return
        gitseries.git(src, "checkout", "-q", "-f", "--detach", item.commit)
        return
    shutil.rmtree(src, ignore_errors=True)
    gitseries.git(found.worktree, "worktree", "prune", check=False)
    src.parent.mkdir(parents=True, exist_ok=True)
    with runner.phase(f"baseline worktree at {item.commit[:12]}"):
        gitseries.git(found.worktree, "worktree", "add", "-q", "--detach", str(src), item.commit, quiet=False)


@dataclass(frozen=True)
class Built:
    kernel: build.Kernel
    before: incremental.Artifacts    # what the O= dir held before this build
    after: incremental.Artifacts
    seconds: float


def build_one(settings: Settings, item: DevBuild, fragments=None) -> Built:
    """Build ``item`` incrementally in its kept O= dir (one build of it at a time)."""
    frags = tuple(fragments if fragments is not None else pipeline.fragments(settings, False))
    tc = build.default_toolchain(settings.cache_dir, settings.jobs, settings.ccache)
    with build.exclusive(item.kdir.parent / f"{item.kdir.name}.lock",
                         f"{item.label}: another harness run is building {item.obj}; waiting for it"):
        start = time.monotonic()
        before = incremental.artifacts(item.obj)
        item.kdir.mkdir(parents=True, exist_ok=True)
        log = item.kdir / "build.log"
        log.write_text("")
        with runner.phase(f"build {item.label} ({item.src}, incremental)"):
            kernel = incremental.build_in_place(item.src, item.obj, item.kdir, label=item.label,
                                                version=read_version(item.src) or "", key=item.key,
                                                fragments=frags, tc=tc, log=log)
        after = incremental.artifacts(item.obj)
    return Built(kernel, before, after, round(time.monotonic() - start, 1))


def test_tree(settings: Settings, found: SeriesTree, *, keyword: str | None = None,
              rows_for: dict | None = None, keep_vm: bool = False):
    """B and P of the series work tree built, then the scenario session on both."""
    tp = plan(settings, found)
    runner.echo(f"  series branch {found.branch} in {found.worktree}: P = the work tree as it is, "
                f"B = {found.base_commit[:12]} (the cover letter's parent)")
    checkout_baseline(found, tp.baseline)
    # P first: B's objects are most likely in ccache already (invoke build compiled them in
    # builds/<baseline>/{src,obj}, laid out as baseline/{src,obj} here)
    built = {item.judged_as: build_one(settings, item) for item in (tp.patched, tp.baseline)}
    for label, b in built.items():
        runner.echo(f"  {label} ({b.kernel.label}): {b.kernel.bzimage} built in {b.seconds:.0f}s")
    from vm.devloop import loopguest

    # the loop guest (invoke retest) would be reused by the session: not if it runs an older P
    loopguest.stop_if_stale(settings, tp.root, tp.patched.label, built[tp.patched.judged_as].after)
    kernels = [(label, b.kernel) for label, b in built.items()]
    return pipeline.scenarios(settings, kernels, rows_for=rows_for, keyword=keyword, keep_vm=keep_vm), built


def series_tree(source: str | None):
    """The series work tree ``source`` (``tree:DIR``) names, or None (any other source)."""
    path = tree_of(source)
    return detect(path) if path is not None else None


def require_series_tree(tree) -> "SeriesTree":
    """The series work tree at ``tree``, or a one-line error saying why it is not one."""
    path = Path(tree).expanduser().resolve()
    found = detect(path)
    if found is None:
        why = ("no such directory" if not path.is_dir() else
               "not the top of a git work tree, a detached HEAD, or a branch without the cover-letter "
               "commit of `invoke series checkout`")
        raise errors.NotASeriesTree(tree=path, why=why)
    return found
