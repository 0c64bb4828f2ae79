"""Harness settings, read from Invoke's config (``invoke.yaml`` and overrides).

One frozen dataclass instead of module-level globals: tasks build it from
``ctx.config.ovl``; pytest builds it the same way through :func:`load`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from vm import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SuitePaths:
    """Where the test suites live, relative to the project root (``ovl.suites``)."""

    unit: str = "tests/unit"
    scenarios: str = "tests/scenarios"                    # the whole scenario suite (smoke, boot failures)
    rows: str = "tests/scenarios/test_scenarios.py"       # the SCENARIOS.md rows alone
    expectations: str = "tests/scenarios/expectations.json"
    bases: str = "tests/scenarios/bases"                  # per-base differences, <base>.json
    boot_failures: str = "tests/scenarios/test_boot_failures.py"   # run once, in its own CI shard
    boot_id: str = "tests/rng"                            # review finding 2: boot id and an unseeded RNG
    bisect: str = "tests/bisect"
    faults: str = "tests/faults"                          # killed harness runs, concurrent runs
    fstests: str = "tests/fstests"                        # fstests -overlay on booted guests
    unionmount: str = "tests/unionmount"                  # unionmount-testsuite on booted guests
    known_failures: str = "tests/fstests/known-failures"  # per-base known fstests failures, <base>.json


@dataclass(frozen=True)
class Settings:
    base: str = "6.12"
    bases: tuple[str, ...] = ()
    source: str = "debian"
    #: base -> its default source where plain "debian" (the installed linux-source-X.Y) cannot serve it
    base_sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cache_dir: Path = Path("~/.cache/ovl-volatile-harness")
    results_dir: Path = Path("results")
    fragments: tuple[str, ...] = ("base",)
    debug_fragment: str = "debug"
    #: added for the boot-id kernel (review finding 2): overlayfs built in, boot-time kprobe events
    boot_rng_fragment: str = "boot-rng"
    jobs: int = 0
    ccache: bool = True
    kernelorg_mirror: str = "https://cdn.kernel.org/pub/linux/kernel"
    debian_mirror: str = "http://deb.debian.org/debian"
    debian_keyring: Path = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    arch: str = "x86_64"
    memory_mb: int = 2048
    cpus: int = 2
    accel: str = "auto"
    kvm_probe_timeout: float = 10.0
    boot_timeout: float = 60.0
    scratch_disks: int = 2
    scratch_size_mb: int = 1024
    image_suite: str = ""
    image_packages: tuple[str, ...] = ()
    ci_variants: tuple[str, ...] = ()
    #: variant -> the only SCENARIOS.md rows `invoke ci` runs on it (read-only)
    ci_rows_for: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    ci_full_variants: tuple[str, ...] = ()
    ci_full_rows_for: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    #: shards `invoke ci` runs at once, each in a process of its own (1: one after the other, in-process)
    ci_lanes: int = 1
    mutation_rows: tuple[str, ...] = ()
    #: fstests and unionmount-testsuite (the field's own suites, see vm/suites/fstests.py)
    #: where the shared material (SCENARIOS.md, vendor/) may be: a source path into ../shared/
    #: is looked up in each, the first that has it (relative: to the checkout)
    shared_dirs: tuple[str, ...] = ("../shared",)
    fstests_source: str = ""
    unionmount_source: str = ""
    suite_packages: tuple[str, ...] = ()      # guest packages the suites need at run time
    suite_scratch_size_mb: int = 16384        # sparse TEST/SCRATCH disks of the suites' guests
    fstests_timeout: float = 600.0            # seconds one fstests test may take (TCG)
    fstests_ci_tests: tuple[str, ...] = ()    # what `invoke ci` runs
    fstests_ci_fs: tuple[str, ...] = ("xfs",)  # on these base filesystems
    fstests_full_groups: tuple[str, ...] = ()  # what `invoke ci --full` adds
    #: `invoke bench` (issue 13): see invoke.yaml
    bench_repeat: int = 3
    bench_virtme_fragment: str = "bench-virtme"
    bench_virtme_package: str = "virtme-ng==1.42"
    bench_row: str = "volatile-to-volatile"
    bench_fs: str = "ext4"
    bench_edit_rows: str = "volatile-to-volatile and not nonvolatile"
    bench_edit_fs: str = "ext4"
    bench_boot_timeout: float = 120.0
    suites: SuitePaths = field(default_factory=SuitePaths)
    project_root: Path = PROJECT_ROOT

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> "Settings":
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in {**dict(data), **{k: v for k, v in overrides.items() if v is not None}}.items():
            if key not in known:
                raise errors.BadArgument(what=f"unknown setting ovl.{key}",
                                         fix=f"use one of: {', '.join(sorted(known))}")
            values[key] = value
        obj = cls(**values)
        return obj.normalised()

    def normalised(self) -> "Settings":
        root = Path(self.project_root)
        results = Path(self.results_dir).expanduser()
        return replace(
            self,
            project_root=root,
            cache_dir=Path(self.cache_dir).expanduser().resolve(),
            debian_keyring=Path(self.debian_keyring).expanduser(),
            results_dir=results if results.is_absolute() else (root / results),
            fragments=tuple(self.fragments), bases=tuple(str(b) for b in self.bases) or (str(self.base),),
            image_packages=tuple(self.image_packages),
            ci_variants=tuple(self.ci_variants), ci_full_variants=tuple(self.ci_full_variants),
            mutation_rows=tuple(self.mutation_rows),
            suite_packages=tuple(self.suite_packages), shared_dirs=tuple(str(d) for d in self.shared_dirs),
            fstests_ci_tests=tuple(self.fstests_ci_tests), fstests_ci_fs=tuple(self.fstests_ci_fs),
            fstests_full_groups=tuple(self.fstests_full_groups),
            suite_scratch_size_mb=int(self.suite_scratch_size_mb), fstests_timeout=float(self.fstests_timeout),
            ci_rows_for=_rows_map(self.ci_rows_for, "ci_rows_for"),
            suites=_suite_paths(self.suites),
            base_sources=MappingProxyType({str(k): str(v) for k, v in dict(self.base_sources or {}).items()}),
            ci_full_rows_for=_rows_map(self.ci_full_rows_for, "ci_full_rows_for"),
            ci_lanes=_count(self.ci_lanes, "ci_lanes", least=1,
                            fix="set it to 1 (shards one after the other) or more (shards at once), "
                                "in invoke.yaml or with `invoke ci --lanes N`"),
            jobs=int(self.jobs), memory_mb=int(self.memory_mb), cpus=int(self.cpus),
            kvm_probe_timeout=float(self.kvm_probe_timeout), boot_timeout=float(self.boot_timeout),
            bench_repeat=int(self.bench_repeat), bench_boot_timeout=float(self.bench_boot_timeout),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what :meth:`from_mapping` reads back (a bisect step gets its settings so)."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, SuitePaths):
                return asdict(value)
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def default_source(self) -> str:
        """The source of ``base`` unless a task names one: ``ovl.base_sources[base]`` or ``ovl.source``."""
        return self.base_sources.get(self.base, self.source)

    def with_base(self, base: str) -> "Settings":
        """The same settings for another kernel base (patches/<base>/ and its source)."""
        return replace(self, base=str(base))

    # --- derived paths ---------------------------------------------------
    @property
    def patches_dir(self) -> Path:
        return self.project_root / "patches" / self.base

    @property
    def series_file(self) -> Path:
        return self.patches_dir / "series"

    def suite_path(self, name: str) -> Path:
        """Absolute path of ``ovl.suites.<name>`` (e.g. ``expectations``)."""
        return self.project_root / getattr(self.suites, name)

    @property
    def kconfig_dir(self) -> Path:
        return self.project_root / "kconfig"

    def sub(self, name: str) -> Path:
        """``<cache_dir>/<name>`` (not created: whoever writes there makes it)."""
        return self.cache_dir / name


def _suite_paths(value: Any) -> SuitePaths:
    if isinstance(value, SuitePaths):
        return value
    known = {f.name for f in fields(SuitePaths)}
    unknown = sorted(set(value or {}) - known)
    if unknown:
        raise errors.BadArgument(what=f"unknown ovl.suites key(s) {', '.join(unknown)}",
                                 fix=f"use {', '.join(sorted(known))}")
    return SuitePaths(**{k: str(v) for k, v in (value or {}).items()})


def _count(value: Any, name: str, *, least: int, fix: str) -> int:
    """A whole number of at least ``least`` from invoke.yaml, the environment or a flag ("2" too)."""
    try:
        number = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < least:
        raise errors.BadArgument(what=f"ovl.{name} must be a whole number >= {least}, not {value!r}", fix=fix)
    return number


def _rows_map(value: Any, name: str) -> Mapping[str, tuple[str, ...]]:
    """``{variant: [row, ...]}`` from invoke.yaml as a read-only mapping of tuples."""
    if not value:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(
            isinstance(rows, (list, tuple)) and all(isinstance(r, str) for r in rows) for rows in value.values()):
        raise errors.BadArgument(what=f"ovl.{name} must map a variant to a list of row ids, not {value!r}",
                                 fix="write it as {patched: [volatile-to-volatile]} in invoke.yaml")
    return MappingProxyType({str(v): tuple(rows) for v, rows in value.items()})


def load(project_root: Path = PROJECT_ROOT, **overrides: Any) -> Settings:
    """Settings as Invoke would see them (project invoke.yaml + env + user files)."""
    from invoke import Config

    cfg = Config(project_location=str(project_root))
    cfg.load_project()
    cfg.load_user()
    cfg.load_shell_env()
    data = dict(cfg.get("ovl", {}))
    return Settings.from_mapping(data, project_root=project_root, **overrides)
