"""The kernel developer's loop: the series as a git branch (``invoke series ...``).

Workflows on top of :mod:`vm.pipeline` (the base's tree, the cover letter, the
lint) and :mod:`vm.kernel.gitseries` (the branch itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vm import errors, pipeline, runner
from vm.devloop import trees
from vm.kernel import gitseries
from vm.kernel import series as series_tools
from vm.kernel.patch import parse_series
from vm.settings import Settings


def default_worktree(settings: Settings, tree: Path) -> Path:
    """``<cache>/devloop/<repo key>-<base>/patched/src``: one worktree per clone and base,
    beside the kept O= dir ``invoke test --source tree:`` and ``invoke retest`` build it in
    (``patched/obj``), laid out like every build under ``builds/`` so ccache hits on the
    objects ``invoke build`` compiled for the same series (see :mod:`vm.devloop.trees`)."""
    return trees.devloop_root(settings, trees.repo_key(gitseries.toplevel(tree))) / "patched" / "src"


def default_onto(settings: Settings, tree: Path, source: str | None = None) -> str:
    """The tag of the base's version (``v7.2.13``) in the user's clone, or a one-line error."""
    version = pipeline.get_tree(settings, source).version
    repo = gitseries.toplevel(tree)
    for tag in (f"v{version}", f"v{version.removesuffix('.0')}"):
        if gitseries.git(repo, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False).ok:
            return tag
    raise errors.BadArgument(what=f"{repo} has no tag v{version} (the {settings.base} series is against "
                                  f"Linux {version})",
                             fix=f"fetch the tag (git fetch --tags), or pass --onto the commit to apply it on")


def series_checkout(settings: Settings, tree: Path, *, onto: str | None = None, worktree: Path | None = None,
                    force: bool = False, source: str | None = None) -> gitseries.Checkout:
    """``patches/<base>/`` as branch ``b4/ovl-volatile-<base>`` in a linked worktree of ``tree``."""
    cover = settings.patches_dir / series_tools.COVER_NAME
    if not cover.is_file():
        raise errors.SeriesError(series=cover, reason="no rendered cover letter",
                                 fix=f"run `invoke cover-letter --base {settings.base}` first")
    wt = (worktree or default_worktree(settings, tree)).expanduser().absolute()
    with runner.phase(f"series checkout ({settings.base})"):
        done = gitseries.checkout(tree, wt, pipeline.series(settings), cover.read_text(), settings.base,
                                  onto or default_onto(settings, tree, source), force=force)
    runner.echo(f"  branch {done.branch} in {done.worktree}: cover letter {done.cover[:12]}, "
                f"{done.patches} patches on {done.onto[:12]}")
    return done


@dataclass(frozen=True)
class ExportResult:
    exported: gitseries.Exported
    cover_written: bool
    notes: tuple[str, ...]


def series_export(settings: Settings, tree: Path, *, branch: str | None = None, lint: bool = True,
                  source: str | None = None) -> ExportResult:
    """The branch back into ``patches/<base>/``, the cover letter re-rendered, then the lint."""
    exporter = gitseries.identity(gitseries.toplevel(tree))
    with runner.phase(f"series export ({settings.base})"):
        done = gitseries.export(tree, branch or gitseries.branch_for(settings.base), settings.patches_dir)
    for name in done.written:
        runner.echo(f"  wrote {name}")
    for name in done.removed:
        runner.echo(f"  removed {name} (no longer in the series)")
    runner.echo(f"  {len(done.kept)} unchanged patch(es) kept as they were")
    tree_of_base = pipeline.get_tree(settings, source)
    cover_written = _write_cover_letter(settings, tree_of_base)
    notes = _notes(settings, done, exporter)
    for note in notes:
        runner.echo(f"  note: {note}")
    problems = series_tools.identity_problems(parse_series(settings.series_file))
    if problems:
        raise errors.SeriesError(series=settings.series_file, reason="; ".join(problems),
                                 fix="sign the commits off on the branch (git rebase --signoff, or "
                                     "git commit --amend -s --reset-author) and export again")
    if lint:
        with runner.phase(f"lint the exported series ({settings.base})"):
            pipeline.lint(settings, tree_of_base)
            pipeline.check_cover_letter(settings, tree_of_base)
    return ExportResult(done, cover_written, tuple(notes))


def _write_cover_letter(settings: Settings, tree) -> bool:
    path = settings.patches_dir / series_tools.COVER_NAME
    text = pipeline.cover_letter(settings, tree)
    if path.is_file() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    runner.echo(f"  wrote {path.name} (re-rendered)")
    return True


def _notes(settings: Settings, done: gitseries.Exported, exporter: str) -> list[str]:
    notes = []
    if done.series.cover_edited:
        notes.append(f"the cover-letter commit was edited; {series_tools.COVER_NAME} is rendered from "
                     f"patches/templates/cover-letter.j2 and patches/{settings.base}/{series_tools.COVER_DATA}: "
                     "carry the edit there")
    authors = gitseries.git(done.series.repo, "log", "--format=%an <%ae>",
                            f"{done.series.cover}..{done.series.tip}").stdout.splitlines()
    others = sorted({a for a in authors if a != exporter})
    if others:
        notes.append(f"patches by {', '.join(others)}, not by you ({exporter}): their From: stays the author")
    return notes
