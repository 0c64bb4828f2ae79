"""Invoke tasks: thin wrappers that parse arguments and call vm/ functions.

    invoke build boot test      # the main job: build kernels, boot one, run the suite
    invoke ci                   # the test command: unit tests, lint, kernels, scenarios
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from invoke import Collection, Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from vm import ci as ci_plan, errors, pipeline, runner  # noqa: E402
from vm.settings import Settings  # noqa: E402
from vm.suites import merge as merging  # noqa: E402


BASE_HELP = "kernel base: patches/<base>/ and its default source (default: ovl.base)"


def settings_of(c, **overrides) -> Settings:
    return Settings.from_mapping(dict(c.config.get("ovl", {})), project_root=ROOT, **overrides)


def harness_task(*args, **kwargs):
    """@task that turns a HarnessError into one line on stderr and a non-zero exit."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(c, *a, **kw):
            try:
                with runner.sigterm_interrupts():   # `kill` stops its guests and builds too
                    return fn(c, *a, **kw)
            except errors.HarnessError as exc:
                print(errors.one_line(exc), file=sys.stderr)
                raise Exit(code=exc.exit_code) from None
            except KeyboardInterrupt as exc:
                print(f"interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
                raise Exit(code=130) from None
        return task(inner, **kwargs)

    if args and callable(args[0]):
        return wrap(args[0])
    return wrap


def _variants(text: str, debug: bool) -> list[pipeline.Variant]:
    return [pipeline.Variant.parse(v.strip(), debug) for v in text.split(",") if v.strip()]


@harness_task
def setup(c):
    """Install the Debian and Python dependencies (runs ./setup.sh)."""
    runner.run([str(ROOT / "setup.sh")], capture=False)


@harness_task(help={"source": "debian | debian-archive:SUITE/PACKAGE[=VERSION] | kernel.org:X.Y.Z | "
                              "tarball:PATH|URL | git:URL@REF | tree:DIR (default: the base's)",
                    "base": BASE_HELP})
def fetch(c, source=None, base=None):
    """Fetch (or reuse) the pristine kernel tree."""
    pipeline.get_tree(settings_of(c, base=base), source)


@harness_task(help={"variants": "comma list of baseline, patched, prefix-N (default: baseline,patched)",
                    "debug": "add kconfig/debug.config (lockdep, KASAN, ...)",
                    "source": "kernel source (see `invoke fetch --help`)",
                    "prefixes": "also build every prefix of the series (prefix-1 .. prefix-N)",
                    "base": BASE_HELP})
def build(c, variants="baseline,patched", debug=False, source=None, prefixes=False, base=None):
    """Build kernels (keyed by tree, series and config: unchanged inputs never rebuild)."""
    s = settings_of(c, base=base)
    wanted = _variants(variants, debug)
    if prefixes:
        wanted += [v for v in pipeline.prefix_variants(s, debug) if v not in wanted]
    _build(s, wanted, source)


def _build(s: Settings, wanted: list[pipeline.Variant], source: str | None = None) -> dict:
    built = dict(pipeline.build_variants(s, wanted, source))
    for label, kernel in built.items():
        print(f"{label}: {kernel.bzimage}")
    pipeline.guest_image(s)
    return built


@harness_task
def image(c):
    """Build (or reuse) the guest root filesystem image."""
    print(pipeline.guest_image(settings_of(c)).path)


@harness_task(help={"variant": "baseline, patched or prefix-N", "detach": "leave the guest running",
                    "debug": "boot the debug-config kernel", "accel": "auto, kvm or tcg",
                    "base": BASE_HELP})
def boot(c, variant="patched", detach=False, debug=False, accel=None, source=None, base=None):
    """Boot a kernel and check SSH; with --detach leave it running for `invoke ssh`."""
    s = settings_of(c, accel=accel, base=base)
    kernel = pipeline.build_kernel(s, pipeline.Variant.parse(variant, debug), pipeline.get_tree(s, source))
    img = pipeline.guest_image(s)
    g = pipeline.boot(s, kernel, img, pipeline.run_dir(s, kernel.label), detach=detach)
    try:
        res = g.run(["uname", "-r"], check=True)
        print(f"guest running {res.stdout.strip()} [{g.plan.spec.accel.name}]")
    except BaseException:
        g.stop()
        raise
    if detach:
        print(f"detached: pid {g.pid}, ssh port {g.plan.spec.ssh_port}; `invoke ssh`, `invoke stop`")
    else:
        g.stop()


@harness_task(help={"command": "run this command instead of an interactive shell",
                    "variant": "which detached guest (default: the only one running)"})
def ssh(c, command=None, variant=None):
    """Open a shell in the detached guest, or run one command (-c) and return its status."""
    found = pipeline.find_guest(settings_of(c), variant)
    if command is None:
        argv = ["ssh", "-i", str(found.plan.key_path), "-p", str(found.plan.spec.ssh_port),
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1"]
        runner.announce(argv)
        os.execvp("ssh", argv)
    with found.conn as conn:
        res = conn.run(command)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.exit_status:
        raise Exit(code=res.exit_status)


@harness_task(help={"variant": "stop only the guests of this label (e.g. patched, or the loop's guest: "
                               "devloop-patched-<clone>-<base>, as `invoke retest` prints it)"})
def stop(c, variant=None):
    """Stop every detached guest (or those of one label)."""
    alive = [g for g in pipeline.running_guests(settings_of(c)) if variant in (None, g.plan.kernel_label)]
    for found in alive:
        found.stop()
        print(f"stopped {found.plan.kernel_label} guest (pid {found.pid}, {found.plan.kernel_release})")
    if not alive:
        print("no guest was running")


def _rows_for(text: str | None) -> dict[str, tuple[str, ...]]:
    """``VARIANT=ROW,ROW;VARIANT=ROW`` -> ``{variant: (row, ...)}``."""
    limits: dict[str, tuple[str, ...]] = {}
    for item in (text or "").split(";"):
        variant, sep, rows = item.strip().partition("=")
        if not item.strip():
            continue
        if not sep or not rows.strip():
            raise errors.BadArgument(what=f"--rows-for {item.strip()!r}", fix="write VARIANT=ROW[,ROW...][;...]")
        limits[variant] = limits.get(variant, ()) + tuple(r.strip() for r in rows.split(",") if r.strip())
    return limits


@harness_task(help={"variants": "kernels to run the scenarios on (default: baseline,patched)",
                    "keep_vm": "leave the last guest running after the run",
                    "k": "pytest -k expression", "debug": "use the debug-config kernels",
                    "source": "kernel source (see `invoke fetch --help`)",
                    "rows_for": "VARIANT=ROW,ROW;...: run only these rows on that variant",
                    "base": BASE_HELP})
def test(c, variants="baseline,patched", keep_vm=False, k=None, debug=False, source=None, rows_for=None,
         base=None):
    """Run the scenario suite on booted guests (building what is missing).  With --source
    tree:DIR on a series branch (`invoke series checkout`): DIR as P, its base commit as B."""
    from vm.devloop import trees

    s = settings_of(c, base=base)
    found = trees.series_tree(source)
    if found is not None:
        result, built = trees.test_tree(s, found, keyword=k, rows_for=_rows_for(rows_for), keep_vm=keep_vm)
        for label, b in built.items():
            print(f"{label}: {b.kernel.bzimage} (built in {b.seconds:.0f}s)")
        print(f"test: {result.counts()} ({result.request.xml})")
        result.check()
        return
    kernels = pipeline.build_variants(s, _variants(variants, debug), source)
    pipeline.scenarios(s, kernels, rows_for=_rows_for(rows_for), keyword=k, keep_vm=keep_vm).check()


@harness_task(help={"bases": "comma list of kernel bases, each with patches/<base>/ and "
                             "tests/scenarios/bases/<base>.json (default: ovl.bases)",
                    "variants": "kernel variants to build and test on every base (default: baseline,patched)",
                    "k": "pytest -k expression"})
def matrix(c, bases=None, variants="baseline,patched", k=None):
    """Version matrix: build the variants on every base, run the suite on all, render one matrix."""
    s = settings_of(c)
    wanted = [b.strip() for b in bases.split(",") if b.strip()] if bases else list(s.bases)
    _matrix(s, wanted, _variants(variants, False), k)


def _matrix(s: Settings, bases: list[str], variants: list[pipeline.Variant], k: str | None = None) -> None:
    kernels = pipeline.matrix_kernels(s, bases, variants)
    results = s.results_dir / "matrix"
    pipeline.scenarios(s, kernels, name="matrix", tests="rows", results_dir=results, keyword=k).check()
    print(f"matrix: {results / 'matrix.md'}")


@harness_task(help={"source": "kernel source whose scripts/checkpatch.pl is used",
                    "base": BASE_HELP})
def lint(c, source=None, base=None):
    """checkpatch --strict on every patch, and the cover letter is up to date."""
    ci_plan.lint(settings_of(c, base=base), source)


@harness_task(name="cover-letter", help={"base": BASE_HELP})
def cover_letter(c, source=None, base=None):
    """Render patches/<base>/0000-cover-letter.patch from the Jinja2 template."""
    from vm.kernel.series import COVER_NAME

    s = settings_of(c, base=base)
    text = pipeline.cover_letter(s, pipeline.get_tree(s, source))
    path = s.patches_dir / COVER_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}")


@harness_task
def unit(c):
    """Fast unit tests (no VM)."""
    ci_plan.unit(settings_of(c))


@harness_task(help={"source": "kernel source (see `invoke fetch --help`)"})
def mutation(c, source=None):
    """Break the series on purpose (drop patch 4, the errseq check) and show that
    exactly the rows that depend on it fail against the full series' expectations."""
    ci_plan.mutation(settings_of(c), source)


@harness_task(help={"tree": "the git clone to bisect (left exactly as it is: the bisect runs in a worktree)",
                    "good": "a commit where the scenario passes with the series applied",
                    "bad": "a commit where it fails",
                    "scenario": "SCENARIOS.md row id to run at each step (judged as the patched kernel)",
                    "fs": "upper filesystem for the scenario (ext4 or xfs)",
                    "run": "instead of --scenario: a command run in the patched tree at each step "
                           "(exit 0 good, 125 skip, 1-127 bad)",
                    "on_build_failure": "skip (default) or bad",
                    "on_boot_failure": "skip (default) or bad",
                    "series": "series file to re-apply (default: patches/<base>/series)",
                    "accel": "auto, kvm or tcg"})
def bisect(c, tree, good, bad, scenario=None, fs="ext4", run=None, on_build_failure="skip",
           on_boot_failure="skip", series=None, accel=None):
    """Find the upstream commit that broke a scenario, re-applying the series at each step."""
    import shlex

    from vm.bisect import Request

    s = settings_of(c, accel=accel)
    req = Request(tree=Path(tree).expanduser().resolve(), good=good, bad=bad, scenario=scenario, fs=fs,
                  command=tuple(shlex.split(run)) if run else (),
                  on_build_failure=on_build_failure, on_boot_failure=on_boot_failure)
    result = pipeline.bisect(s, req, Path(series).resolve() if series else None)
    for step in result.steps:
        print(f"  step {step.n}: {step.commit[:12]} {step.verdict:5} {step.subject} ({step.reason})")
    if result.first_bad:
        print(f"first bad commit: {result.first_bad} {result.first_bad_subject}")
    else:
        print("skipped commits left it open; the first bad commit is one of: "
              + " ".join(c[:12] for c in result.candidates))
    print(f"report: {result.report_dir / 'report.md'} ({len(result.steps)} steps, {result.seconds:.0f}s)")


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


@harness_task(help={"variants": "kernels (default: baseline,patched; the verdict is P against B)",
                    "fs": "base filesystems of TEST/SCRATCH (default: ext4,xfs)",
                    "g": "fstests group(s), e.g. overlay/quick (comma list)",
                    "tests": "fstests test(s), e.g. overlay/118,overlay/081 (comma list)",
                    "mount_options": "OVERLAY_MOUNT_OPTIONS for every test, e.g. volatile",
                    "base": BASE_HELP})
def fstests(c, variants="baseline,patched", fs="ext4,xfs", g=None, tests=None, mount_options="", base=None):
    """fstests ./check -overlay on booted guests; fails on a regression of P against B."""
    s = settings_of(c, base=base)
    _fstests(s, _variants(variants, False), _csv(fs), _csv(g), _csv(tests), mount_options)


def _fstests(s: Settings, variants, filesystems, groups=(), tests=(), mount_options="") -> None:
    verdict = pipeline.fstests_check(s, variants, filesystems, groups, tests or (() if groups else None),
                                     mount_options)
    print(verdict.render("fstests -overlay", s.base))


@harness_task(help={"variants": "kernels (default: baseline,patched)", "base": BASE_HELP})
def unionmount(c, variants="baseline,patched", base=None):
    """unionmount-testsuite (./run --ov --verify, --ov --samefs) on booted guests, JUnit."""
    _unionmount(settings_of(c, base=base), _variants(variants, False))


def _unionmount(s: Settings, variants) -> None:
    result = pipeline.unionmount_run(s, variants)
    print(f"unionmount-testsuite: {result.counts()} ({s.results_dir / 'unionmount' / 'unionmount.xml'})")
    result.check()


@harness_task(help={"full": "also run the full tier (see README)",
                    "shard": "run only this shard of the tier (a CI job; names: --list-shards)",
                    "list_shards": "print the tier's shards as JSON for a CI job matrix, run nothing",
                    "gitlab": "with --list-shards: print the GitLab child pipeline that runs them",
                    "lanes": "shards run at once, each in a process of its own, output prefixed [shard] "
                             "(default: ovl.ci_lanes; 1: one after the other)"})
def ci(c, full=False, shard=None, list_shards=False, gitlab=False, lanes=None):
    """The test command: unit tests, lint, every series prefix built, scenarios, fstests and unionmount on guests."""
    s = settings_of(c, ci_lanes=lanes)
    if list_shards:
        print(json.dumps(ci_plan.gitlab_pipeline(s, full) if gitlab else ci_plan.shard_matrix(s, full)))
        return
    phases = ci_plan.plan(s, full)
    if shard:
        out = ci_plan.run_shard(s, ci_plan.pick(phases, shard), phases, full)
        print(f"shard {shard}: {out} (merge with `invoke report --merge '{out.parent}/*'`)")
        return
    merged = ci_plan.run_all(s, phases, full)
    if (s.results_dir / "matrix.md").is_file():     # the whole tier's matrix, as one session printed it
        print((s.results_dir / "matrix.md").read_text(), end="")
    _merged(merged, s.results_dir)


@harness_task(iterable=["merge"],
              help={"merge": "a shard's results dir (repeatable; comma lists and quoted globs too, "
                             "e.g. 'results/shards/*')",
                    "summary": "print the Markdown summary of these shard dirs (a CI job summary), merge nothing",
                    "out": "where the merged matrix, junit.xml and summary.md go (default: ovl.results_dir)"})
def report(c, merge=None, summary=False, out=None):
    """One matrix (Markdown + HTML) and one JUnit file from the results of several CI shards."""
    dirs = merging.expand(list(merge or []))
    if summary:
        print(merging.summary(merging.collect(dirs)), end="")
        return
    target = Path(out).resolve() if out else settings_of(c).results_dir
    _merged(merging.merge(dirs, target), target)


def _merged(merged: merging.Merged, out: Path) -> None:
    print(f"merged {len(merged.shards)} shard(s): {out / merging.SUMMARY}, {out / merging.JUNIT}, "
          f"matrices: {', '.join(str(out / k / 'matrix.md') for k in sorted(merged.matrices)) or 'none'}")


ns = Collection(setup, fetch, build, image, boot, ssh, stop, test, unit, lint, cover_letter, mutation,
                matrix, bisect, ci, report, fstests, unionmount)
ns.configure({"ovl": {}})


# --- the series as a git branch (issue 13): `invoke series checkout|export --tree DIR` ---------------

SERIES_ACTIONS = ("checkout", "export")


@harness_task(positional=["action"], help={
    "action": "checkout: patches/<base>/ as a git branch (git am + a b4 cover-letter commit) in a linked "
              "worktree of --tree; export: that branch back into patches/<base>/, then the lint",
    "tree": "your kernel git clone (never checked out: the branch lives in a linked worktree)",
    "base": BASE_HELP,
    "onto": "checkout: commit to apply the series on (default: the tag of the base's version, e.g. v7.2.13)",
    "worktree": "checkout: where the worktree goes (default: <cache>/devloop/<clone>-<base>/patched/src)",
    "force": "checkout: throw away an existing branch b4/ovl-volatile-<base> and its worktree",
    "branch": "export: the series branch (default: b4/ovl-volatile-<base>)",
    "no_lint": "export: skip checkpatch and the cover letter check",
    "source": "kernel source of the base (see `invoke fetch --help`)"})
def series(c, action, tree, base=None, onto=None, worktree=None, force=False, branch=None, no_lint=False,
           source=None):
    """The series as a git branch: `invoke series checkout --tree DIR`, edit, `invoke series export --tree DIR`."""
    from vm.devloop import series as devseries

    if action not in SERIES_ACTIONS:
        raise errors.BadArgument(what=f"unknown series action {action!r}", fix="use checkout or export")
    s = settings_of(c, base=base)
    repo = Path(tree).expanduser().resolve()
    if action == "checkout":
        done = devseries.series_checkout(s, repo, onto=onto, worktree=Path(worktree) if worktree else None,
                                       force=force, source=source)
        print(f"branch {done.branch} checked out in {done.worktree} ({done.patches} patches on "
              f"{done.onto[:12]}); edit, commit, `git rebase -i {done.cover[:12]}`, `b4 prep`; "
              f"then `invoke series export --tree {tree}`")
        return
    res = devseries.series_export(s, repo, branch=branch, lint=not no_lint, source=source)
    ex = res.exported
    print(f"{s.patches_dir}: {len(ex.written)} written, {len(ex.kept)} unchanged, {len(ex.removed)} removed, "
          f"series file {'rewritten' if ex.series_file_changed else 'unchanged'}, cover letter "
          f"{'re-rendered' if res.cover_written else 'unchanged'}")


ns.add_task(series)


@harness_task(help={
    "tree": "the series work tree (`invoke series checkout` prints it); its uncommitted edits are tested",
    "k": "pytest -k expression (default: every row)",
    "fs": "run the rows on this upper filesystem only (ext4 or xfs; default: both)",
    "base": BASE_HELP})
def retest(c, tree, k=None, fs=None, base=None):
    """The inner loop: rebuild P incrementally, boot, reboot or reload overlay.ko in the loop
    guest (left running), run the rows."""
    from vm.devloop import loop, trees

    s = settings_of(c, base=base)
    done = loop.retest(s, trees.require_series_tree(tree), keyword=k, filesystems=_csv(fs))
    # the library printed `retest: <path> (<why>)` when it decided, before acting on it
    print(f"verdict: {done.result.counts()} in {done.seconds:.0f}s (build {done.build_seconds:.0f}s, "
          f"{done.decision.path} {done.action_seconds:.0f}s, rows {done.session_seconds:.0f}s); "
          f"the loop guest stays up (`invoke ssh --variant {done.label}`, "
          f"`invoke stop --variant {done.label}`)")
    done.result.check()


ns.add_task(retest)


# --- `invoke bench` (issue 13): not a test; a table and results/bench.json -----------------

@harness_task(help={
    "repeat": "samples per measurement (default 0: ovl.bench_repeat)",
    "only": "comma list of build, boot, bare, vng, scenario, suite, edit (default: all of them)",
    "cold": "also a cold build: its own empty ccache and a fresh O=, each sample costs minutes",
    "dev_tree": "the series worktree of `invoke series checkout`: times `invoke retest` after an edit",
    "base": BASE_HELP})
def bench(c, repeat=0, only=None, cold=False, dev_tree=None, base=None):
    """Time builds, boots (harness, bare QEMU floor, virtme-ng), a scenario, the suite, edit-to-verdict."""
    from vm import bench as bench_lib, benchmain

    s = settings_of(c, base=base)
    names = bench_lib.select(only, cold)
    n = int(repeat) or s.bench_repeat
    rows, path = benchmain.run(s, names, n, Path(dev_tree).expanduser().resolve() if dev_tree else None)
    print(bench_lib.render(rows, n), end="")
    print(f"bench: {path}")


ns.add_task(bench)
