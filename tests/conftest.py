"""Shared pytest configuration: options, markers' fixtures, the guest pool.

Scenario tests ask for ``guest`` (and ``variant``); every kernel variant is
booted once per session and reused by all its scenarios.  A guest left
running by ``invoke boot --detach`` for the same kernel is reused too.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from vm import errors, pipeline
from vm.kernel.build import Kernel
from vm.machine import console
from vm.machine import guest as guest_mod
from vm.machine.image import Image
from vm.settings import load
from vm.suites import scenario

RESULTS = "results"


def pytest_addoption(parser):
    group = parser.getgroup("ovl-volatile-harness")
    group.addoption("--kernel", action="append", default=[], metavar="VARIANT=BUILD_DIR",
                    help="kernel for a variant (baseline, patched, prefix-N): a build dir with "
                         "out/build.json; repeatable. Without it the kernels are built first.")
    group.addoption("--baseline", metavar="BUILD_DIR", default=None,
                    help="shorthand for --kernel baseline=BUILD_DIR")
    group.addoption("--image", metavar="ROOTFS", default=None, help="guest rootfs.ext4 to boot")
    group.addoption("--rows-for", action="append", default=[], metavar="VARIANT=ROW[,ROW...]",
                    help="run only these SCENARIOS.md rows on VARIANT (the others are deselected, "
                         "not skipped); repeatable")
    group.addoption("--fs", action="append", default=[], metavar="FS",
                    help="run the scenarios on this upper filesystem only (ext4, xfs); repeatable")
    group.addoption("--keep-vm", action="store_true", default=False,
                    help="leave the guests running (detached) after the session; see `invoke ssh`")
    group.addoption("--require-inputs", action="store_true", default=False,
                    help="a test input that is always there in the test command (SCENARIOS.md, "
                         "an sshd binary) fails the test when missing, instead of skipping it")
    group.addoption("--suite-disk", action="append", default=[], metavar="NAME=PATH",
                    help="fstests/unionmount: a suite's disk image (made by vm/suites/fstests.py)")
    group.addoption("--fstests-test", action="append", default=[], metavar="overlay/NNN",
                    help="fstests: a test to run (repeatable; the pipeline expands groups)")
    group.addoption("--fstests-mount-options", default="", metavar="OPTS",
                    help="fstests: OVERLAY_MOUNT_OPTIONS for every test, e.g. volatile")


def _kernel_options(config) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for item in config.getoption("--kernel"):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = pipeline.PATCHED, item
        found[name] = Path(path)
    if config.getoption("--baseline"):
        found[pipeline.BASELINE] = Path(config.getoption("--baseline"))
    return found


def _rows_for(config) -> dict[str, set[str]]:
    limits: dict[str, set[str]] = {}
    for item in config.getoption("--rows-for"):
        variant, sep, rows = item.partition("=")
        if not sep or not rows:
            raise pytest.UsageError(f"--rows-for {item!r}: expected VARIANT=ROW[,ROW...]")
        limits.setdefault(variant, set()).update(r.strip() for r in rows.split(",") if r.strip())
    return limits


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    limits = _rows_for(config)
    if not limits:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        rows = limits.get(params.get("variant"))
        (drop if rows is not None and "row" in params and params["row"] not in rows else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc):
    if "variant" not in metafunc.fixturenames:
        return
    variants = list(_kernel_options(metafunc.config)) or [pipeline.BASELINE, pipeline.PATCHED]
    metafunc.parametrize("variant", variants, ids=variants, scope="session")


@pytest.fixture(scope="session")
def missing_input(request):
    """``missing_input(what, fix)``: a test input is missing; fails the test under
    ``--require-inputs`` (the test command), skips it otherwise."""
    def missing(what: str, fix: str) -> NoReturn:
        __tracebackhide__ = True
        text = f"{what} is missing: {fix}"
        if request.config.getoption("--require-inputs"):
            pytest.fail(f"{text} (--require-inputs: a missing input is a failure)", pytrace=False)
        pytest.skip(text)
    return missing


@pytest.fixture(scope="session")
def settings():
    return load()


@pytest.fixture(scope="session")
def results_dir(settings) -> Path:
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    return settings.results_dir


def _load_kernel(path: Path) -> Kernel:
    stamp = path / "out" / "build.json" if path.is_dir() else path
    if not stamp.is_file():
        raise errors.BadArgument(what=f"{path} is not a finished kernel build (no out/build.json)",
                                 fix="run `invoke build` and pass its build dir")
    return Kernel.load(stamp)


@pytest.fixture(scope="session")
def kernel_paths(request) -> dict[str, Path]:
    return _kernel_options(request.config)


@pytest.fixture(scope="session")
def guest_image(request, settings) -> Image:
    given = request.config.getoption("--image")
    if given:
        return Image(Path(given), "given")
    return pipeline.guest_image(settings)


@pytest.fixture(scope="session")
def kernel(variant, kernel_paths, settings) -> Kernel:
    if variant in kernel_paths:
        return _load_kernel(kernel_paths[variant])
    name, _, base = variant.partition("@")
    if base:
        settings = dataclasses.replace(settings, base=base)
    tree = pipeline.get_tree(settings)
    return pipeline.build_kernel(settings, pipeline.Variant.parse(name), tree)


@pytest.fixture(scope="session")
def guest(request, variant, kernel, guest_image, settings, results_dir):
    """A booted guest running ``kernel``, shared by every scenario of the variant.

    A detached guest of the same kernel (``invoke boot --detach``, ``--keep-vm``) is
    reused when no other session is using it; otherwise a fresh guest boots in a run
    dir of its own, so sessions running at the same time never share one."""
    keep = request.config.getoption("--keep-vm")
    g = guest_mod.claim_idle(pipeline.running_guests(settings), kernel, guest_image)
    if g is not None:
        print(f"\nreusing the detached {kernel.label} guest (pid {g.pid}, {g.plan.run_dir})")
        keep = True
    else:
        g = pipeline.boot(settings, kernel, guest_image, pipeline.run_dir(settings, kernel.label),
                          detach=keep)
    try:
        yield g
    finally:
        shutil.copy2(g.plan.spec.console_log, results_dir / f"console-{kernel.label}.log")
        if keep:
            print(f"\nkept {kernel.label} guest: pid {g.pid}, port {g.plan.spec.ssh_port} "
                  f"(`invoke ssh --variant {kernel.label}`)")
        else:
            g.stop()
        g.release()


class KernelLog:
    """The guest kernel log written during one test."""

    def __init__(self, g, label: str) -> None:
        self.g = g
        self.marker = scenario.kmsg_mark(g, label)
        self._lines: list[str] | None = None

    def lines(self, refresh: bool = True) -> list[str]:
        if refresh or self._lines is None:
            self._lines = scenario.kmsg_since(self.g, self.marker)
        return self._lines

    def text(self) -> str:
        return "\n".join(self.lines())

    def splats(self) -> list[console.Splat]:
        return console.find_splats(self.lines())


@pytest.fixture
def klog(request, guest, kernel, record_property):
    """Marks the guest kernel log; after the test any splat in it fails the test."""
    record_property("kernel_release", kernel.release)
    record_property("kernel_variant", kernel.label)
    record_property("series_hash", kernel.series_hash)
    record_property("config_hash", kernel.config_hash)
    record_property("accelerator", guest.plan.spec.accel.name)
    return KernelLog(guest, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    log = item.funcargs.get("klog") if hasattr(item, "funcargs") else None
    if isinstance(log, KernelLog):
        lines = log.lines()
        item.add_report_section("call", "guest kernel log", "\n".join(lines))
        splats = console.find_splats(lines)
        if splats:
            detail = "\n".join("\n".join(s.context) for s in splats)
            raise AssertionError(f"kernel reported {', '.join(str(s) for s in splats)}\n{detail}")
    return result
