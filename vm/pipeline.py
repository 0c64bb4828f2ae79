"""Plain functions the Invoke tasks and the pytest fixtures share.

Each step takes :class:`~vm.settings.Settings` and returns a value object;
nothing here parses command lines or prints usage.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from vm import bisect as bisect_mod
from vm import errors, runner
from vm.kernel import build, fetch, kconfig
from vm.kernel.patch import Series, parse_series
from vm.machine import guest, image
from vm.settings import Settings
from vm.suites import fstests, report, suite
from vm.suites.scenario import Expectations
from vm.suites.suite import SuiteRequest, SuiteResult

BASELINE = "baseline"
PATCHED = "patched"


@dataclass(frozen=True)
class Variant:
    """Which kernel: the baseline, the full series, or the first N patches."""

    name: str                 # "baseline", "patched", "prefix-3"
    patches: int | None       # None: all of them
    debug: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}-debug" if self.debug else self.name

    @classmethod
    def parse(cls, text: str, debug: bool = False) -> "Variant":
        if text.endswith("-debug"):
            text, debug = text[: -len("-debug")], True
        if text == BASELINE:
            return cls(BASELINE, 0, debug)
        if text == PATCHED:
            return cls(PATCHED, None, debug)
        if text.startswith("prefix-") and text[7:].isdigit():
            return cls(text, int(text[7:]), debug)
        raise errors.BadArgument(what=f"unknown kernel variant {text!r}",
                                 fix="use baseline, patched or prefix-N")


def get_tree(settings: Settings, source: str | None = None) -> fetch.Tree:
    spec = fetch.SourceSpec.parse(source or settings.default_source, settings.base)
    with runner.phase(f"fetch {spec.kind}:{spec.value}"):
        tree = fetch.fetch(spec, settings.sub("sources"), kernelorg_mirror=settings.kernelorg_mirror,
                           debian_mirror=settings.debian_mirror, debian_keyring=settings.debian_keyring)
    runner.echo(f"  tree: {tree.path} (Linux {tree.version}, {tree.origin})")
    return tree


def series(settings: Settings) -> Series:
    return parse_series(settings.series_file)


def prefix_variants(settings: Settings, debug: bool = False) -> list[Variant]:
    """baseline, prefix-1 .. prefix-(N-1), patched: every prefix of the series."""
    count = len(series(settings))
    return ([Variant(BASELINE, 0, debug)]
            + [Variant(f"prefix-{n}", n, debug) for n in range(1, count)]
            + [Variant(PATCHED, None, debug)])


def series_for(settings: Settings, variant: Variant) -> Series:
    if variant.patches == 0:
        return Series(Path("none"), ())
    full = series(settings)
    if not len(full):
        raise errors.SeriesError(series=settings.series_file, reason="the series is empty",
                                 fix="list the patches in it, or build the baseline only")
    return full if variant.patches is None else full.prefix(variant.patches)


def fragments(settings: Settings, debug: bool) -> tuple[kconfig.Fragment, ...]:
    names = list(settings.fragments) + ([settings.debug_fragment] if debug else [])
    return tuple(kconfig.resolve_fragments(names, settings.kconfig_dir))


def build_kernel(settings: Settings, variant: Variant, tree: fetch.Tree) -> build.Kernel:
    inputs = build.BuildInputs(label=variant.label, tree_path=tree.path, tree_key=tree.key,
                               version=tree.version, series=series_for(settings, variant),
                               fragments=fragments(settings, variant.debug))
    tc = build.default_toolchain(settings.cache_dir, settings.jobs, settings.ccache)
    with runner.phase(f"build {variant.label}"):
        return build.build(inputs, settings.sub("builds"), tc)


def guest_image(settings: Settings, extra_packages: tuple[str, ...] = ()) -> image.Image:
    """The guest image; ``extra_packages`` (e.g. ``ovl.suite_packages``) make another one."""
    spec = image.ImageSpec(suite=settings.image_suite or image.host_suite(),
                           packages=(tuple(image.DEFAULT_PACKAGES) + tuple(settings.image_packages)
                                     + tuple(p for p in extra_packages if p not in image.DEFAULT_PACKAGES)),
                           sources=image.host_sources())
    with runner.phase("guest image"):
        return image.build_image(spec, settings.sub("images"))


def run_dir(settings: Settings, label: str) -> Path:
    """A fresh run dir for one guest of this kernel variant (console, disks, state), held
    by this process: ``<cache>/run/<label>-<pid>-<tag>/``.  Stale ones are pruned."""
    return guest.new_run_dir(settings.sub("run"), label)


def boot(settings: Settings, kernel: build.Kernel, img: image.Image, run_dir: Path,
         *, detach: bool = False, extra_disks: tuple = ()) -> guest.Guest:
    """Boot ``kernel`` in ``run_dir``.  A detached boot replaces the idle detached guests
    of the same variant (as `invoke boot --detach` always did); guests another harness
    process is using are left alone."""
    if detach:
        for old in running_guests(settings):
            if old.plan.kernel_label == kernel.label and old.plan.run_dir != run_dir and old.claim():
                runner.echo(f"  stopping the idle detached {old.plan.kernel_label} guest (pid {old.pid})")
                old.stop()
                old.release()
    with runner.phase(f"boot {kernel.label} ({kernel.release})"):
        return guest.Guest.boot(guest.plan(settings, kernel, img, run_dir, extra=tuple(extra_disks)),
                                detach=detach)


def running_guests(settings: Settings) -> list[guest.Guest]:
    """Detached guests that are still alive, oldest first (stale state files are dropped)."""
    def started(state: Path) -> float:
        try:
            return state.stat().st_mtime
        except OSError:
            return 0.0

    found = []
    for state in sorted(settings.sub("run").glob(f"*/{guest.STATE_FILE}"), key=started):
        try:
            found.append(guest.attach(state.parent))
        except errors.GuestNotRunning:
            pass
    return found


def find_guest(settings: Settings, label: str | None) -> guest.Guest:
    """The detached guest of variant ``label`` (the newest if several), or the only one."""
    alive = running_guests(settings)
    if label:
        alive = [g for g in alive if g.plan.kernel_label == label]
        if not alive:
            raise errors.GuestNotRunning(reason=f"no detached {label} guest found")
        return alive[-1]
    if len(alive) == 1:
        return alive[0]
    if not alive:
        raise errors.GuestNotRunning(reason="no detached guest found")
    raise errors.BadArgument(what=f"{len(alive)} guests are running "
                                  f"({', '.join(g.plan.kernel_label for g in alive)})",
                             fix="pick one with --variant")


def lint(settings: Settings, tree: fetch.Tree) -> list:
    """checkpatch --strict on every patch; raises if any is not clean."""
    from vm.kernel import series as series_tools

    results = series_tools.checkpatch(tree.path, series(settings))
    for r in results:
        runner.echo(f"  {'clean' if r.clean else 'NOT CLEAN'}: {r.patch}: {r.errors} errors, "
                    f"{r.warnings} warnings, {r.checks} checks")
    dirty = [r for r in results if not r.clean]
    if dirty:
        for r in dirty:
            for line in r.output.splitlines():
                if line.startswith(("ERROR:", "WARNING:", "CHECK:")):
                    runner.echo(f"  | {r.patch}: {line}")
        raise errors.LintFailed(count=len(dirty), patches=", ".join(r.patch for r in dirty))
    problems = series_tools.identity_problems(series(settings))
    if problems:
        raise errors.SeriesError(series=settings.series_file, reason="; ".join(problems),
                                 fix="export the series with your identity (git config user.name and "
                                     "user.email) as author and Signed-off-by")
    return results


def cover_letter(settings: Settings, tree: fetch.Tree) -> str:
    """Render patches/templates/cover-letter.j2 for the series on this tree."""
    import shutil
    import tempfile

    from vm.kernel import series as series_tools

    full = series(settings)
    settings.sub("builds").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-cover-", dir=settings.sub("builds")))
    try:
        from vm.kernel.patch import prepare_source

        patched = prepare_source(tree.path, full, scratch / "src")
        stat = series_tools.diffstat(tree.path, patched, full)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return series_tools.render_cover_letter(
        full, settings.project_root / "patches" / "templates" / "cover-letter.j2",
        diffstat_text=stat, base_version=tree.version, base_commit=getattr(tree, "commit", None),
        recipients=series_tools.maintainers(tree.path, full))


def check_cover_letter(settings: Settings, tree: fetch.Tree) -> Path:
    from vm.kernel import series as series_tools

    path = settings.patches_dir / series_tools.COVER_NAME
    fresh = cover_letter(settings, tree)
    if not path.is_file():
        raise errors.StaleCoverLetter(path=path, why="it does not exist")
    if path.read_text() != fresh:
        raise errors.StaleCoverLetter(path=path, why=series_tools.stale_reason(path.read_text(), tree.version))
    return path


def bisect(settings: Settings, req, series_file: Path | None = None) -> "object":
    """Check the request against the expectations table, then run :func:`vm.bisect.bisect`."""
    def make_image() -> Path:     # called once the refs are known good
        return guest_image(settings).path

    if req.scenario:
        table = Expectations.load(settings.suite_path("expectations"))
        if req.scenario not in table.row_ids:
            raise errors.BadArgument(what=f"unknown scenario {req.scenario!r}",
                                     fix=f"use a SCENARIOS.md row id: {', '.join(table.row_ids)}")
        if req.fs not in table.filesystems:
            raise errors.BadArgument(what=f"unknown filesystem {req.fs!r}",
                                     fix=f"use one of {', '.join(table.filesystems)}")
    return bisect_mod.bisect(settings, req, series_file or settings.series_file,
                             image=make_image if req.scenario else None,
                             fragments=fragments(settings, False))


def matrix_kernels(settings: Settings, bases: list[str], variants: list[Variant]) -> list[tuple[str, build.Kernel]]:
    """Build every variant on every base: ``[("patched@6.1", kernel), ...]``, base by base.

    Each base uses its own series (patches/<base>/) and its own source (the
    configured source kind, e.g. Debian's linux-source-<base>).
    """

    bases_dir = settings.suite_path("bases")
    for base in bases:
        missing = [str(p) for p in (settings.project_root / "patches" / base / "series",
                                    bases_dir / f"{base}.json") if not p.is_file()]
        if missing:
            raise errors.BadArgument(what=f"base {base!r} has no {' and no '.join(missing)}",
                                     fix="add the series and its expectations file, or drop the base")
    built = []
    for base in bases:
        per_base = settings.with_base(base)
        tree = get_tree(per_base)
        for variant in variants:
            built.append((f"{variant.label}@{base}", build_kernel(per_base, variant, tree)))
    return built


# --- suites on kernels ---------------------------------------------------------------

def build_variants(settings: Settings, variants: list[Variant],
                   source: str | None = None) -> list[tuple[str, build.Kernel]]:
    """``[(label, kernel), ...]`` for the variants on ``settings.base``."""
    tree = get_tree(settings, source)
    return [(v.label, build_kernel(settings, v, tree)) for v in variants]


def scenarios(settings: Settings, kernels: list[tuple[str, build.Kernel]], *, name: str = "scenarios",
              tests: str = "scenarios", results_dir: Path | None = None,
              rows_for: dict[str, tuple[str, ...]] | None = None, keyword: str | None = None,
              keep_vm: bool = False, options: tuple[str, ...] = (),
              filesystems: tuple[str, ...] = ()) -> SuiteResult:
    """The scenario suite (``ovl.suites.<tests>``) on booted ``kernels``, one session."""
    req = SuiteRequest(name=name, tests=(getattr(settings.suites, tests),),
                       results_dir=results_dir or settings.results_dir,
                       kernels=tuple((label, k.build_dir) for label, k in kernels),
                       image=guest_image(settings).path, rows_for=rows_for or {}, keyword=keyword,
                       keep_vm=keep_vm, options=options, filesystems=tuple(filesystems))
    return suite.run(settings.project_root, req)


def tests_without_kernels(settings: Settings, which: str, *, markers: str | None = None,
                          options: tuple[str, ...] = ()) -> SuiteResult:
    """A suite that needs no kernel given (``unit``, ``bisect``), results as ``<which>.xml``."""
    req = SuiteRequest(name=which, tests=(getattr(settings.suites, which),),
                       results_dir=settings.results_dir, markers=markers, options=options)
    return suite.run(settings.project_root, req)


def mutation_problems(result: SuiteResult, targeted: set[str]) -> list[str]:
    """Why a mutation run does not show what it must: exactly ``targeted`` failed, as a
    failed assertion, and every other case passed.  A setup error (a boot that failed,
    a crash), a skip or a missing case never counts as the expected failure."""
    problems = []
    failed = set(result.named("failed"))
    if failed - targeted:
        problems.append(f"unexpected failures: {', '.join(sorted(failed - targeted))}")
    if targeted - failed:
        problems.append(f"should have failed but did not: {', '.join(sorted(targeted - failed))}")
    for outcome in ("error", "skipped"):
        if result.named(outcome):
            problems.append(f"{outcome}: {', '.join(result.named(outcome))}")
    if not result.cases:
        problems.append(f"no test ran (pytest exited {result.returncode})")
    return problems


def mutation(settings: Settings, source: str | None = None) -> tuple[SuiteResult, set[str]]:
    """The series without its last patch, judged by the full series' expectations."""
    n = len(series(settings))
    broken = build_kernel(settings, Variant(f"prefix-{n - 1}", n - 1), get_tree(settings, source))
    result = scenarios(settings, [(PATCHED, broken)], name="scenarios", tests="rows",
                       results_dir=settings.results_dir / "mutation")
    filesystems = Expectations.load(settings.suite_path("expectations")).filesystems
    targeted = {f"test_row[{row}-{fs}-{PATCHED}]" for row in settings.mutation_rows for fs in filesystems}
    return result, targeted


# --- the field's own suites: fstests and unionmount-testsuite ---------------------------

SUITE_KINDS = {
    "fstests": fetch.TreeKind("fstests tree", fstests.fstests_version,
                              "use an fstests (xfstests-dev) tarball, e.g. ../shared/vendor/xfstests-*.tar.gz"),
    "unionmount": fetch.TreeKind("unionmount-testsuite tree", fstests.unionmount_version,
                                 "use a unionmount-testsuite tarball, e.g. ../shared/vendor/unionmount-testsuite-*"),
}


def boot_rng_settings(settings: Settings) -> Settings:
    """The settings of the boot-id kernel (review finding 2): ``ovl.fragments`` + ``ovl.boot_rng_fragment``."""
    extra = () if settings.boot_rng_fragment in settings.fragments else (settings.boot_rng_fragment,)
    return replace(settings, fragments=settings.fragments + extra)


#: how a source path into the shared material (``ovl.shared_dirs``) starts
SHARED_PREFIX = "../shared/"


def suite_source(settings: Settings, which: str) -> fetch.SourceSpec:
    """``ovl.<which>_source`` parsed; a relative tarball:/tree: path is relative to the checkout,
    and one into ``../shared/`` is looked up in each of ``ovl.shared_dirs`` (the first that has it)."""
    text = getattr(settings, f"{which}_source")
    if not text:
        raise errors.BadArgument(what=f"ovl.{which}_source is empty",
                                 fix="set it to tarball:PATH#sha256=HEX or git:URL@REF in invoke.yaml")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("tarball", "tree") and not rest.startswith(("/", "http://", "https://", "file:")):
        text = f"{prefix}:{local_path(settings, rest)}"
    return fetch.SourceSpec.parse(text, settings.base)


def local_path(settings: Settings, rest: str) -> str:
    """``rest`` (a relative path, perhaps with a ``#sha256=`` tail) made absolute: under the
    checkout, or for ``../shared/...`` under the first of ``ovl.shared_dirs`` that has the file
    (a clone elsewhere on the machine, e.g. CI's, still finds the shared material)."""
    path, hash_sep, tail = rest.partition("#")
    candidates = [settings.project_root / path]
    if path.startswith(SHARED_PREFIX):
        inside = path[len(SHARED_PREFIX):]
        candidates = [settings.project_root / d / inside for d in settings.shared_dirs] or candidates
    found = next((c for c in candidates if c.exists()), candidates[0])
    return f"{found}{hash_sep}{tail}"


def suite_disk(settings: Settings, which: str) -> fstests.SuiteDisk:
    """The suite's tree fetched (verified, cached), fstests built with patches/fstests/
    applied, packed into a disk for the guest: reused while source and patches are."""
    spec = suite_source(settings, which)
    with runner.phase(f"fetch {which} ({spec.kind}:{spec.value})"):
        try:
            tree = fetch.fetch(spec, settings.sub("suites"), kind=SUITE_KINDS[which])
        except errors.SourceNotFound as exc:
            raise errors.BadArgument(what=f"{which} source {exc.fields.get('what')} not found",
                                     fix=f"set ovl.{which}_source to the tarball's path (../shared/vendor/, "
                                         "see its SHA256SUMS; ovl.shared_dirs lists where ../shared/ is looked "
                                         "up) or to its upstream git (README)") from None
    patches = fstests.series_patches(settings.project_root / "patches" / "fstests") if which == "fstests" else []
    return fstests.build_disk(which, tree.path, tree.key, patches, settings.sub("suites") / "builds",
                              make=which == "fstests", jobs=settings.jobs)


def _suite_request(settings: Settings, which: str, kernels, disk: fstests.SuiteDisk,
                   filesystems: tuple[str, ...] = (), options: tuple[str, ...] = ()) -> SuiteRequest:
    results = settings.results_dir / which
    return SuiteRequest(name=which, tests=(getattr(settings.suites, which),), results_dir=results,
                        kernels=tuple((label, k.build_dir) for label, k in kernels),
                        image=guest_image(settings, settings.suite_packages).path, filesystems=filesystems,
                        options=("--suite-disk", f"{which}={disk.disk}", *options))


def fstests_run(settings: Settings, variants: list[Variant], filesystems: tuple[str, ...],
                groups: tuple[str, ...] = (), tests: tuple[str, ...] = (),
                mount_options: str = "") -> "fstests.Verdict":
    """``./check -overlay`` of the selected tests on every variant and base fs, one pytest
    session; the verdict is the regression diff of patched against baseline."""
    unknown = sorted(set(filesystems) - set(fstests.FILESYSTEMS)) or ([] if filesystems else ["(none)"])
    if unknown:
        raise errors.BadArgument(what=f"unknown base filesystem(s) {', '.join(unknown)}",
                                 fix=f"use --fs {','.join(fstests.FILESYSTEMS)} or a part of it")
    disk = suite_disk(settings, "fstests")
    selected = fstests.select(disk.root, groups, tests)
    runner.echo(f"  fstests: {len(selected)} test(s) x {', '.join(filesystems)} x "
                f"{', '.join(v.label for v in variants)}")
    kernels = build_variants(settings, variants)
    options = tuple(x for t in selected for x in ("--fstests-test", t))
    if mount_options:
        options += ("--fstests-mount-options", mount_options)
    # fstests' overlay/union tests run unionmount-testsuite themselves: its disk goes along
    options += ("--suite-disk", f"unionmount={suite_disk(settings, 'unionmount').disk}")
    req = _suite_request(settings, "fstests", kernels, disk, filesystems, options)
    for label, _ in kernels:
        for fs in filesystems:
            shutil.rmtree(req.results_dir / f"{label}-{fs}", ignore_errors=True)
    result = suite.run(settings.project_root, req)
    known = fstests.KnownFailures.load(settings.suite_path("known_failures") / f"{settings.base}.json")
    verdict = fstests.judge(result.cases, known, [label for label, _ in kernels], filesystems,
                            returncode=result.returncode)
    verdict.write(req.results_dir, settings.results_dir / "matrix.md", settings.base,
                  fstests.section_title(groups, filesystems))
    return verdict


def boot_suite_guest(settings: Settings, kernel: build.Kernel, img: image.Image,
                     disks: dict[str, Path]) -> guest.Guest:
    """A fresh guest for fstests/unionmount-testsuite: large sparse TEST/SCRATCH disks
    (``ovl.suite_scratch_size_mb``) and each suite's disk as a snapshot (writable,
    thrown away with the guest), found in the guest by its serial."""
    from vm.machine import qemu

    serials = {"fstests": fstests.FSTESTS_SERIAL, "unionmount": fstests.UNIONMOUNT_SERIAL}
    unknown = sorted(set(disks) - set(serials))
    if unknown:
        raise errors.BadArgument(what=f"unknown suite disk(s) {', '.join(unknown)}",
                                 fix=f"use {', '.join(serials)}")
    big = replace(settings, scratch_size_mb=settings.suite_scratch_size_mb)
    extra = tuple(qemu.Disk(Path(path), serials[name], snapshot=True) for name, path in disks.items())
    label = "-".join(disks) + f"-{kernel.label}"
    return boot(big, kernel, img, run_dir(settings, label), extra_disks=extra)


def unionmount_run(settings: Settings, variants: list[Variant]) -> SuiteResult:
    """unionmount-testsuite (``./run --ov --verify`` and ``--ov --samefs``) on every
    variant, one pytest session (JUnit in results/unionmount/); each variant's guest is
    its own, and the suite's mounts are cleaned up (and checked gone) after each run."""
    disk = suite_disk(settings, "unionmount")
    kernels = build_variants(settings, variants)
    req = _suite_request(settings, "unionmount", kernels, disk)
    result = suite.run(settings.project_root, req)
    lines = [f"## unionmount-testsuite (base {settings.base})", "", result.counts(), ""]
    lines += [f"- {c.name}: {c.outcome}{(': ' + c.message) if c.message else ''}" for c in result.cases]
    report.merge_section(settings.results_dir / "matrix.md", "unionmount-testsuite", "\n".join(lines))
    (req.results_dir / "report.md").write_text("\n".join(lines) + "\n")
    return result


def fstests_mutation(settings: Settings, filesystems: tuple[str, ...] = ("ext4", "xfs")) -> list[str]:
    """The series without its last patch (as `invoke mutation`), judged as the full series by
    the series' own fstests test on each fs: it must fail there (and be notrun on B).
    Returns the problems; empty when exactly that happened."""
    n = len(series(settings))
    mutated, own = Variant(f"prefix-{n - 1}", n - 1), "overlay/118"
    settings = replace(settings, results_dir=settings.results_dir / "mutation")   # beside its scenarios
    verdict = fstests_run(settings, [Variant.parse(BASELINE), mutated], filesystems, (), (own,))
    problems = []
    for fs in filesystems:
        got = verdict.results.get((mutated.label, fs), {}).get(own)
        if got is None or got.outcome != fstests.FAILED:
            problems.append(f"{own} on {fs} ({mutated.label}): {got.outcome if got else 'did not run'}, "
                            "expected failed")
        base = verdict.results.get((BASELINE, fs), {}).get(own)
        if base is None or base.outcome != fstests.NOTRUN:
            problems.append(f"{own} on {fs} (baseline): {base.outcome if base else 'did not run'}, expected notrun")
    return problems


def fstests_check(settings: Settings, variants: list[Variant], filesystems: tuple[str, ...],
                  groups: tuple[str, ...] = (), tests: tuple[str, ...] | None = None,
                  mount_options: str = "") -> "fstests.Verdict":
    """:func:`fstests_run` (``tests=None`` and no group: ``ovl.fstests_ci_tests``) that
    raises :class:`~vm.errors.SuiteVerdict` on a regression or an unmet expectation."""
    if not groups and tests is None:
        tests = settings.fstests_ci_tests
    verdict = fstests_run(settings, variants, filesystems, groups, tuple(tests or ()), mount_options)
    if not verdict.ok:
        runner.echo(verdict.render("fstests -overlay", settings.base))
        raise errors.SuiteVerdict(name="fstests", what="regression or unmet expectation (see above)",
                                  fix="read the diff and results/fstests/<variant>-<fs>/",
                                  report=settings.results_dir / "fstests" / "report.md")
    return verdict


def fstests_mutation_check(settings: Settings) -> None:
    problems = fstests_mutation(settings)
    if problems:
        raise errors.SuiteVerdict(name="fstests mutation", what="; ".join(problems),
                                  fix="overlay/118 must fail without the errseq patch and be notrun on B",
                                  report=settings.results_dir / "mutation" / "fstests" / "report.md")
    runner.echo("fstests mutation check passed: overlay/118 fails without the errseq patch")


