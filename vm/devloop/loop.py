"""``invoke retest --tree DIR``: the kernel developer's inner loop.

Edit the series work tree, run ``invoke retest``: P is rebuilt incrementally in
its kept ``O=`` dir (:mod:`vm.devloop.trees`), then :func:`decide` picks the
cheapest way to get the loop guest onto the new build, comparing what the
guest runs (recorded in ``loop.json`` at its boot or last module reload,
:mod:`vm.devloop.loopguest`) with what was built:

- ``boot``: no loop guest is running (never started, exited, or stale);
- ``reboot``: built-in code changed (``vmlinux.o``, see
  :func:`vm.kernel.incremental.artifacts`): the guest restarts on the new kernel;
- ``module-reload``: only ``overlay.ko`` changed: the new module is swapped
  into the running guest (:mod:`vm.machine.modreload`); if that fails, reboot;
- ``unchanged``: nothing the guest runs changed (the rows still run).

Then the rows run on the loop guest (``-k``, ``--fs``), judged as P against
the base's expectations, and the guest stays running for the next retest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vm import errors, pipeline, runner
from vm.devloop import loopguest, trees
from vm.kernel import incremental
from vm.kernel.incremental import Artifacts
from vm.settings import Settings
from vm.suites.suite import SuiteResult

BOOT, REBOOT, RELOAD, UNCHANGED = "boot", "reboot", "module-reload", "unchanged"


@dataclass(frozen=True)
class Decision:
    path: str
    why: str


def decide(before: Artifacts | None, after: Artifacts, guest_alive: bool) -> Decision:
    """How the loop guest gets onto ``after`` when it runs ``before`` (None: unknown)."""
    if not guest_alive:
        return Decision(BOOT, "no loop guest is running")
    if before is None:
        return Decision(REBOOT, "what the loop guest runs is unknown")
    if not after.builtin:
        return Decision(REBOOT, "the build has no vmlinux.o to compare")
    if before.builtin != after.builtin:
        return Decision(REBOOT, "built-in code changed (vmlinux.o differs)")
    if before.overlay != after.overlay:
        return Decision(RELOAD, "only fs/overlayfs/overlay.ko changed")
    return Decision(UNCHANGED, "neither the kernel nor overlay.ko changed")


@dataclass
class Retest:
    decision: Decision
    result: SuiteResult
    build_seconds: float
    action_seconds: float
    session_seconds: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    label: str = ""                  # the loop guest's label, for `invoke ssh/stop --variant`


def _boot(settings: Settings, tp: trees.TreePlan, kernel, g):
    if g is not None:
        g.stop()
        g.release()
    img = pipeline.guest_image(settings)
    return pipeline.boot(settings, kernel, img, pipeline.run_dir(settings, kernel.label), detach=True)


def _act(settings: Settings, tp: trees.TreePlan, built: trees.Built, found: loopguest.Found,
         decision: Decision, notes: list[str]):
    """Bring the loop guest onto the build; returns the guest (claimed by this process)."""
    from vm.machine import modreload

    g = found.guest
    if decision.path in (BOOT, REBOOT):
        return _boot(settings, tp, built.kernel, g)
    if decision.path == RELOAD:
        ko = (tp.patched.obj / incremental.OVERLAY_KO).read_bytes()
        try:
            done = modreload.reload_overlay(g.conn, ko)
        except errors.InfraError as exc:
            line = f"retest: {REBOOT} (the module reload failed: {exc})"
            runner.echo(line)
            notes.append(line)
            return _boot(settings, tp, built.kernel, g)
        runner.echo(f"  overlay module swapped: {done.path} <- new overlay.ko, build id "
                    f"{done.before[-40:] or '(none loaded)'} -> {done.after[-40:]}")
    return g


def retest(settings: Settings, found: trees.SeriesTree, *, keyword: str | None = None,
           filesystems: tuple[str, ...] = ()) -> Retest:
    start = time.monotonic()
    tp = trees.plan(settings, found)
    built = trees.build_one(settings, tp.patched)
    loop = loopguest.find(settings, tp.root, tp.patched.label)
    before = loop.state.artifacts if (loop.guest is not None and loop.state) else None
    decision = decide(before, built.after, loop.guest is not None)
    why = decision.why if loop.guest is not None else f"{decision.why}: {loop.note}"
    runner.echo(f"retest: {decision.path} ({why})")
    notes: list[str] = []
    act_start = time.monotonic()
    g = _act(settings, tp, built, loop, decision, notes)
    try:
        loopguest.write_state(tp.root, g, built.after)
    finally:
        g.conn.close()
        g.release()       # the test session claims it next
    action = time.monotonic() - act_start
    session_start = time.monotonic()
    result = pipeline.scenarios(settings, [(tp.patched.judged_as, built.kernel)], name="retest", tests="rows",
                                results_dir=settings.results_dir / "retest", keyword=keyword,
                                filesystems=filesystems, keep_vm=True)
    now = time.monotonic()
    return Retest(Decision(decision.path, why), result, built.seconds, round(action, 1),
                  round(now - session_start, 1), round(now - start, 1), notes, tp.patched.label)
