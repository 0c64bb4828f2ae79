"""Harness settings, read from Invoke's config (``invoke.yaml`` and overrides).

One frozen dataclass instead of module-level globals: tasks build it from
``ctx.config.ovl``; pytest builds it the same way through :func:`load`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from vm import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    base: str = "6.12"
    bases: tuple[str, ...] = ()
    source: str = "debian"
    cache_dir: Path = Path("~/.cache/ovl-volatile-harness")
    results_dir: Path = Path("results")
    fragments: tuple[str, ...] = ("base",)
    debug_fragment: str = "debug"
    jobs: int = 0
    ccache: bool = True
    kernelorg_mirror: str = "https://cdn.kernel.org/pub/linux/kernel"
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
    ci_rows_for: Any = None
    ci_full_variants: tuple[str, ...] = ()
    ci_full_rows_for: Any = None
    mutation_rows: tuple[str, ...] = ()
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
            results_dir=results if results.is_absolute() else (root / results),
            fragments=tuple(self.fragments), bases=tuple(str(b) for b in self.bases) or (str(self.base),),
            image_packages=tuple(self.image_packages),
            ci_variants=tuple(self.ci_variants), ci_full_variants=tuple(self.ci_full_variants),
            mutation_rows=tuple(self.mutation_rows),
            jobs=int(self.jobs), memory_mb=int(self.memory_mb), cpus=int(self.cpus),
            kvm_probe_timeout=float(self.kvm_probe_timeout), boot_timeout=float(self.boot_timeout),
        )

    # --- derived paths ---------------------------------------------------
    @property
    def patches_dir(self) -> Path:
        return self.project_root / "patches" / self.base

    @property
    def series_file(self) -> Path:
        return self.patches_dir / "series"

    @property
    def kconfig_dir(self) -> Path:
        return self.project_root / "kconfig"

    def sub(self, name: str) -> Path:
        path = self.cache_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def load(project_root: Path = PROJECT_ROOT, **overrides: Any) -> Settings:
    """Settings as Invoke would see them (project invoke.yaml + env + user files)."""
    from invoke import Config

    cfg = Config(project_location=str(project_root))
    cfg.load_project()
    cfg.load_user()
    cfg.load_shell_env()
    data = dict(cfg.get("ovl", {}))
    return Settings.from_mapping(data, project_root=project_root, **overrides)
