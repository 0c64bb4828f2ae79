"""Bisect an upstream kernel tree with the out-of-tree series re-applied at every step.

``git bisect run`` drives the search in a *linked worktree* of the user's
repository (``git worktree add --detach``), so the user's own checkout, HEAD,
branch and index are never touched, and bisect state (``refs/bisect/*``,
``BISECT_LOG``) is per-worktree in git and disappears with the worktree.

At each step git runs ``python -m vm.bisect step STATE.json`` in the worktree:

1. apply the series (GNU patch, as ``invoke build`` does); if it does not
   apply the step exits 125 (*skip*) and records which patch and hunk;
2. build incrementally in a kept ``O=`` directory (kbuild recompiles only what
   changed; files the series rewrites get their previous mtime back when their
   patched content is unchanged, so re-applying the series does not force a
   rebuild of everything that includes ``linux/fs.h``); the packaged kernel is
   kept per (commit, series, config), so a repeated bisect reuses it;
3. boot it and run the one scenario (``tests/scenarios`` on ``--kernel
   patched=...`` judged against the *patched* expectations), or run a user
   command instead of 2-3;
4. map the outcome: scenario passed -> good (0), failed -> bad (1); a series
   that does not apply, a build failure or a boot failure -> skip (125) by
   default (or bad, by policy); a harness problem -> 255, which aborts the
   bisect;
5. put the worktree back to the commit (``git reset --hard``, ``git clean``).

Every step appends a record to ``steps.jsonl`` in the report directory; at the
end ``result.json`` and ``report.md`` name the first bad commit and list the
steps.  The worktree is removed and the user's tree compared with a snapshot
taken at the start, also after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from vm import errors, runner
from vm.kernel import build, gitseries, incremental, kconfig
from vm.kernel.fetch import read_version
from vm.kernel.patch import apply_patch, parse_series
from vm.settings import Settings
from vm.suites import suite

GOOD, BAD, SKIP, ABORT = 0, 1, 125, 255
VERDICTS = {GOOD: "good", BAD: "bad", SKIP: "skip", ABORT: "abort"}
POLICIES = ("skip", "bad")
STEPS_FILE = "steps.jsonl"
KERNEL_LABEL = "bisect"
#: each step's kernel is judged by the expectations of the full series
KERNEL_JUDGED_AS = "patched"
#: bump when a step's build recipe changes, so kept step kernels are not reused
STEP_RECIPE = "1"


# --- git ------------------------------------------------------------------------

def git(repo: Path, *args: str, check: bool = True, quiet: bool = True) -> runner.Result:
    return runner.run(["git", "-C", repo, *args], check=check, quiet=quiet)


def toplevel(tree: Path) -> Path:
    return gitseries.toplevel(tree, fix="pass the top of a clone, e.g. of "
                                        "git://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git")


resolve = gitseries.resolve


def subject(repo: Path, commit: str) -> str:
    return git(repo, "log", "-1", "--format=%s", commit).stdout.strip()


@dataclass(frozen=True)
class TreeState:
    """What 'the user's tree exactly as it was' means: compared before and after."""

    head: str
    branch: str
    status: str
    worktrees: str

    def differences(self, other: "TreeState") -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def snapshot(repo: Path) -> TreeState:
    branch = git(repo, "symbolic-ref", "-q", "HEAD", check=False).stdout.strip()
    status = git(repo, "status", "--porcelain=v1", "--untracked-files=all", "--ignore-submodules").stdout
    worktrees = git(repo, "worktree", "list", "--porcelain").stdout
    return TreeState(head=git(repo, "rev-parse", "HEAD").stdout.strip(), branch=branch or "(detached)",
                     status=status, worktrees=worktrees)


def restore_worktree(wt: Path) -> None:
    """Back to the checked-out commit: no patched or generated file left."""
    git(wt, "reset", "-q", "--hard")
    git(wt, "clean", "-q", "-f", "-d")


# --- what a step checks -----------------------------------------------------------

@dataclass(frozen=True)
class Request:
    tree: Path
    good: str
    bad: str
    scenario: str | None = None          # a SCENARIOS.md row id, judged as the patched kernel
    fs: str = "ext4"
    command: tuple[str, ...] = ()        # or: a command run in the patched worktree
    on_build_failure: str = "skip"
    on_boot_failure: str = "skip"

    def __post_init__(self) -> None:
        if bool(self.scenario) == bool(self.command):
            raise errors.BadArgument(what="a bisect needs exactly one of --scenario and --run",
                                     fix="name the scenario that went wrong, or a command to judge each step")
        for name in ("on_build_failure", "on_boot_failure"):
            if getattr(self, name) not in POLICIES:
                raise errors.BadArgument(what=f"--{name.replace('_', '-')} {getattr(self, name)!r}",
                                         fix=f"use one of {', '.join(POLICIES)}")

    @property
    def label(self) -> str:
        return f"{self.scenario}-{self.fs}" if self.scenario else "command"


@dataclass
class StepRecord:
    n: int
    commit: str
    subject: str
    verdict: str                  # good | bad | skip | abort
    reason: str
    seconds: float
    log: str = ""
    kernel: str = ""

    @classmethod
    def from_json(cls, line: str) -> "StepRecord":
        return cls(**json.loads(line))


@dataclass
class Result:
    good: str
    bad: str
    first_bad: str | None
    first_bad_subject: str
    candidates: list[str]
    steps: list[StepRecord]
    report_dir: Path
    status: str = "done"          # done | undecided (skips left candidates) | interrupted | failed
    seconds: float = 0.0
    request: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["report_dir"] = str(self.report_dir)
        return json.dumps(data, indent=2)


def read_steps(report_dir: Path) -> list[StepRecord]:
    path = report_dir / STEPS_FILE
    if not path.is_file():
        return []
    return [StepRecord.from_json(ln) for ln in path.read_text().splitlines() if ln.strip()]


_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.M)
_ONLY_SKIPPED = "There are only 'skip'ped commits left to test."


def parse_run_output(text: str) -> tuple[str | None, list[str]]:
    """``git bisect run`` output -> (first bad commit, candidates if skips left it open)."""
    if m := _FIRST_BAD.search(text):
        return m.group(1), [m.group(1)]
    if _ONLY_SKIPPED in text:
        after = text.split("The first bad commit could be any of:", 1)[-1]
        candidates = re.findall(r"^([0-9a-f]{40})\b", after, re.M)
        return None, candidates
    return None, []


# --- the series, re-applied -------------------------------------------------------

def apply_series(wt: Path, series_file: Path) -> list[str]:
    """Apply the series in place; returns the files it changed or created."""

    series = parse_series(series_file)
    for patch in series.patches:
        apply_patch(patch, wt)
    out = git(wt, "status", "--porcelain=v1", "-z", "--untracked-files=all").stdout
    return [entry[3:] for entry in out.split("\0") if len(entry) > 3]


def keep_mtimes(wt: Path, changed: Sequence[str], memo_path: Path) -> int:
    """Give files whose patched content is unchanged since the last step their old mtime.

    GNU patch rewrites every file it touches, so without this each step would
    look like a change to ``include/linux/fs.h`` and rebuild nearly the whole
    kernel.  The memo keeps, per file, the hash and mtime of its latest patched
    content; a file gets its old mtime back only when it matches, so anything
    built from another content is still older than the file.  Returns how many
    files kept their mtime.
    """
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    kept = 0
    for rel in changed:
        path = wt / rel
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        old = memo.get(rel)
        if old and old[0] == digest:
            os.utime(path, ns=(old[1], old[1]))
            kept += 1
        else:
            memo[rel] = [digest, path.stat().st_mtime_ns]
    tmp = memo_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
    tmp.replace(memo_path)
    return kept


# --- one step (runs under `git bisect run`) ------------------------------------------

@dataclass
class StepContext:
    state: dict
    wt: Path
    report_dir: Path
    commit: str
    subject: str
    n: int
    dir: Path
    started: float

    def record(self, code: int, reason: str, log: Path | None = None, kernel: str = "") -> int:
        rec = StepRecord(n=self.n, commit=self.commit, subject=self.subject, verdict=VERDICTS[code],
                         reason=reason, seconds=round(time.monotonic() - self.started, 1),
                         log=str(log or ""), kernel=kernel)
        with open(self.report_dir / STEPS_FILE, "a") as fh:
            fh.write(json.dumps(asdict(rec)) + "\n")
        runner.echo(f"bisect step {rec.n}: {self.commit[:12]} {self.subject!r}: {rec.verdict.upper()} "
                    f"({reason}) in {rec.seconds:.0f}s")
        return code


def run_step(state_path: Path) -> int:
    state = json.loads(state_path.read_text())
    wt = Path(state["worktree"])
    report_dir = Path(state["report_dir"])
    commit = git(wt, "rev-parse", "HEAD").stdout.strip()
    n = len(read_steps(report_dir)) + 1
    ctx = StepContext(state, wt, report_dir, commit, subject(wt, commit), n,
                      report_dir / "steps" / f"{n:02d}-{commit[:12]}", time.monotonic())
    ctx.dir.mkdir(parents=True, exist_ok=True)
    runner.echo(f"==> bisect step {n}: {commit[:12]} {ctx.subject}")
    try:
        return _step(ctx)
    except errors.HarnessError as exc:
        return ctx.record(ABORT, f"harness error: {exc}")
    except Exception as exc:  # noqa: BLE001 - a harness bug must abort the bisect, never read as "bad"
        traceback.print_exc()
        return ctx.record(ABORT, f"harness bug: {type(exc).__name__}: {exc}")
    finally:
        restore_worktree(wt)


def _step(ctx: StepContext) -> int:
    state = ctx.state
    try:
        changed = apply_series(ctx.wt, Path(state["series_file"]))
    except errors.PatchDoesNotApply as exc:
        patch = Path(str(exc.fields.get("patch", "?"))).name
        return ctx.record(SKIP, f"series does not apply: {patch}: {exc.fields.get('detail', '')}")
    kept = keep_mtimes(ctx.wt, changed, Path(state["mtimes"]))
    if state.get("command"):
        return _command_step(ctx, kept)
    return _scenario_step(ctx)


def _command_step(ctx: StepContext, kept: int) -> int:
    log = ctx.dir / "command.log"
    env = {"OVL_BISECT_COMMIT": ctx.commit, "OVL_BISECT_OBJ": ctx.state["obj"]}
    rc = runner.run_logged(ctx.state["command"], log, cwd=ctx.wt, env=env)
    if rc == 0:
        return ctx.record(GOOD, "command exited 0", log)
    if rc == SKIP:
        return ctx.record(SKIP, "command exited 125 (cannot test)", log)
    if 0 < rc < 128:
        return ctx.record(BAD, f"command exited {rc}", log)
    return ctx.record(ABORT, f"command exited {rc} (killed?)", log)


def _settings(state: dict) -> Settings:
    return Settings.from_mapping(state["settings"])


def step_kernel_dir(state: dict, commit: str) -> Path:
    return Path(state["kernels"]) / f"{commit[:12]}-{state['inputs_key']}"


def _build_step_kernel(ctx: StepContext, settings: Settings) -> build.Kernel:
    kdir = step_kernel_dir(ctx.state, ctx.commit)
    if (done := build.existing(kdir)) is not None:
        runner.echo(f"  kernel for {ctx.commit[:12]} already built: {kdir}")
        return done
    fragments = [kconfig.parse_fragment(Path(f)) for f in ctx.state["fragments"]]
    tc = build.default_toolchain(settings.cache_dir, settings.jobs, settings.ccache)
    series = parse_series(Path(ctx.state["series_file"]))
    return incremental.build_in_place(ctx.wt, Path(ctx.state["obj"]), kdir, label=KERNEL_LABEL,
                                      version=read_version(ctx.wt) or "", key=ctx.commit[:12],
                                      fragments=fragments, tc=tc, log=ctx.dir / "build.log",
                                      series=[p.name for p in series.patches],
                                      series_hash=series.fingerprint())


def _scenario_step(ctx: StepContext) -> int:
    state = ctx.state
    settings = _settings(state)
    build_log = ctx.dir / "build.log"
    try:
        kernel = _build_step_kernel(ctx, settings)
    except (errors.BuildFailed, errors.ConfigOptionsDropped) as exc:
        code = BAD if state["on_build_failure"] == "bad" else SKIP
        first = next(iter(build.error_lines(build_log, limit=1)), "") if build_log.is_file() else ""
        why = f"build failed: {first}" if first else f"build failed: {exc}"
        return ctx.record(code, why, build_log)
    log = ctx.dir / "scenario.log"
    req = suite.SuiteRequest(name="scenario", tests=(settings.suites.rows,), results_dir=ctx.dir,
                             kernels=((KERNEL_JUDGED_AS, kernel.build_dir),), image=Path(state["image"]),
                             rows_for={KERNEL_JUDGED_AS: (state["scenario"],)}, filesystems=(state["fs"],),
                             log=log, show=lambda line: line.startswith(("PASSED", "FAILED", "ERROR")))
    result = suite.run(settings.project_root, req, env={"INVOKE_OVL_ACCEL": settings.accel})
    return _judge(ctx, result, log, str(kernel.build_dir))


def _judge(ctx: StepContext, result: suite.SuiteResult, log: Path, kernel: str) -> int:
    if len(result.cases) != 1:
        return ctx.record(ABORT, f"expected one scenario result, pytest exited {result.returncode} with "
                                 f"{len(result.cases)} (see {log})", log, kernel)
    case = result.cases[0]
    if case.outcome == "passed":
        return ctx.record(GOOD, f"{case.name} passed", log, kernel)
    if case.outcome == "failed":
        return ctx.record(BAD, f"{case.name} failed: {case.message}", log, kernel)
    if case.outcome == "error":
        code = BAD if ctx.state["on_boot_failure"] == "bad" else SKIP
        return ctx.record(code, f"boot or setup failed: {case.message}", log, kernel)
    return ctx.record(SKIP, f"{case.name} was skipped: {case.message}", log, kernel)


# --- the whole bisect --------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.BisectBusy(path=path.parent) from None
        yield


def _remove_worktree(repo: Path, wt: Path) -> None:
    if (wt / ".git").exists():
        git(wt, "reset", "-q", "--hard", check=False)
        git(wt, "bisect", "reset", "--quiet", check=False)
        git(repo, "worktree", "remove", "--force", str(wt), check=False)
    shutil.rmtree(wt, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)


def state_key(repo: Path, inputs_key: str) -> str:
    return hashlib.sha256(f"{repo.resolve()}\0{inputs_key}".encode()).hexdigest()[:12]


def _check_refs(req: Request) -> tuple[Path, str, str]:
    """The repository and the good and bad commits, or a one-line error."""
    repo = toplevel(req.tree)
    good = resolve(repo, req.good, "--good")
    bad = resolve(repo, req.bad, "--bad")
    if good == bad:
        raise errors.BadArgument(what="--good and --bad are the same commit", fix="pass two different commits")
    if not git(repo, "merge-base", "--is-ancestor", good, bad, check=False).ok:
        raise errors.BadArgument(what=f"--good {req.good} is not an ancestor of --bad {req.bad}",
                                 fix="swap them, or pick a good commit that the bad one contains")
    return repo, good, bad


def _step_state(settings: Settings, req: Request, root: Path, report_dir: Path, series_file: Path,
                fragments: Sequence[kconfig.Fragment], image_path: Path | None) -> dict:
    """What every ``python -m vm.bisect step`` reads (it runs in another process)."""
    recipe = f"{STEP_RECIPE}\0{parse_series(series_file).fingerprint()}\0{kconfig.fingerprint(fragments)}"
    return {
        "worktree": str(root / "src"), "obj": str(root / "obj"), "kernels": str(root / "kernels"),
        "mtimes": str(root / "mtimes.json"), "report_dir": str(report_dir),
        "series_file": str(series_file), "inputs_key": hashlib.sha256(recipe.encode()).hexdigest()[:12],
        "fragments": [str(f.path) for f in fragments],
        "settings": settings.to_dict(), "image": str(image_path or ""),
        "scenario": req.scenario, "fs": req.fs, "command": list(req.command),
        "on_build_failure": req.on_build_failure, "on_boot_failure": req.on_boot_failure,
    }


def _run_bisect(repo: Path, wt: Path, state_path: Path, result: Result, settings: Settings) -> None:
    """``git bisect run`` in the worktree; fills ``result`` or raises :class:`BisectFailed`."""
    report_dir = result.report_dir
    git(repo, "worktree", "add", "--detach", "-q", str(wt), result.bad, quiet=False)
    git(wt, "bisect", "start", result.bad, result.good, quiet=False)
    log = report_dir / "git-bisect-run.log"
    rc = runner.run_logged(["git", "bisect", "run", sys.executable, "-m", "vm.bisect", "step",
                            str(state_path)], log, cwd=wt, env={"PYTHONPATH": str(settings.project_root)},
                           show=_show_bisect_line, new_session=True)
    (report_dir / "bisect.log").write_text(git(wt, "bisect", "log", check=False).stdout)
    result.first_bad, result.candidates = parse_run_output(log.read_text(errors="replace"))
    result.steps = read_steps(report_dir)
    # `git bisect run` exits non-zero also when only skipped commits are left:
    # that is still an answer (a set of candidates), not a failure
    if not result.candidates:
        result.status = "failed"
        aborted = [s for s in result.steps if s.verdict == "abort"]
        reason = (f"step {aborted[-1].n} at {aborted[-1].commit[:12]}: {aborted[-1].reason}"
                  if aborted else f"`git bisect run` exited {rc}: {runner.tail(log.read_text(), 2)}")
        raise errors.BisectFailed(reason=reason, fix=f"see {log}; the user tree is unchanged")
    result.status = "done" if result.first_bad else "undecided"
    if result.first_bad:
        result.first_bad_subject = subject(repo, result.first_bad)


def bisect(settings: Settings, req: Request, series_file: Path, *, image: Callable[[], Path] | None = None,
           fragments: Sequence[kconfig.Fragment] = ()) -> Result:
    """Run the whole bisect; the user's tree is left exactly as it was.

    ``image`` makes (or finds) the guest image; it is called once the
    request was checked, so a wrong ref fails in a second, not after mmdebstrap.
    ``fragments`` are the config fragments every step kernel is built with.
    """
    start = time.monotonic()
    repo, good, bad = _check_refs(req)
    parse_series(series_file)          # a broken series file fails now, not at every step
    image_path = image() if image is not None else None
    root = settings.sub("bisect") / state_key(repo, kconfig.fingerprint(fragments) if fragments else "")
    report_dir = settings.results_dir / "bisect" / req.label
    with _locked(root / "lock"):
        shutil.rmtree(report_dir, ignore_errors=True)
        report_dir.mkdir(parents=True)
        wt = root / "src"
        (root / "obj").mkdir(parents=True, exist_ok=True)
        _remove_worktree(repo, wt)      # left over from a run that was killed
        before = snapshot(repo)         # after that cleanup: the leftover was ours, not the user's
        state_path = report_dir / "state.json"
        state_path.write_text(json.dumps(_step_state(settings, req, root, report_dir, series_file,
                                                     fragments, image_path), indent=2))
        result = Result(good=good, bad=bad, first_bad=None, first_bad_subject="", candidates=[], steps=[],
                        report_dir=report_dir, status="interrupted", request=_request_dict(req))
        try:
            _run_bisect(repo, wt, state_path, result, settings)
        finally:
            _remove_worktree(repo, wt)
            result.steps = read_steps(report_dir)
            result.seconds = round(time.monotonic() - start, 1)
            write_report(result)
            changed = before.differences(snapshot(repo))
            if changed:
                raise errors.TreeChanged(repo=repo, what=", ".join(changed))
    return result


def _show_bisect_line(line: str) -> bool:
    return line.startswith(("Bisecting:", "bisect step", "==> bisect step", "There are only",
                            "The first bad commit")) or bool(_FIRST_BAD.match(line))


def _request_dict(req: Request) -> dict:
    data = asdict(req)
    data["tree"] = str(req.tree)
    data["command"] = shlex.join(req.command) if req.command else ""
    return data


def write_report(result: Result) -> None:
    d = result.report_dir
    (d / "result.json").write_text(result.to_json())
    lines = [f"# Bisect: {result.request.get('scenario') or result.request.get('command')}"
             f"{' on ' + result.request['fs'] if result.request.get('scenario') else ''}", "",
             f"- tree: `{result.request.get('tree')}`",
             f"- good: `{result.good}`, bad: `{result.bad}`",
             f"- status: {result.status} in {result.seconds:.0f}s"]
    if result.first_bad:
        lines.append(f"- **first bad commit: `{result.first_bad}` {result.first_bad_subject}**")
    elif result.candidates:
        lines.append("- skipped commits left it open; the first bad commit is one of: "
                     + ", ".join(f"`{c[:12]}`" for c in result.candidates))
    lines += ["", "| # | commit | subject | verdict | reason | time | log |",
              "|---|---|---|---|---|---|---|"]
    for s in result.steps:
        reason = s.reason.replace("|", "\\|")[:200]
        lines.append(f"| {s.n} | `{s.commit[:12]}` | {s.subject} | {s.verdict} | {reason} | "
                     f"{s.seconds:.0f}s | {s.log} |")
    (d / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "step":
        # git bisect run reads any exit of 1-127 but 125 as "bad": everything
        # that is not a verdict, including an uncaught exception, must be 255
        try:
            return run_step(Path(argv[1]))
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            return ABORT
    print("usage: python -m vm.bisect step STATE.json  (run by `git bisect run`; see `invoke bisect`)",
          file=sys.stderr)
    return ABORT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
