"""The loop's guest: the ``devloop-patched-<clone>-<base>`` guest ``invoke retest`` keeps running.

``<devloop root>/loop.json`` records which guest it is (run dir, QEMU pid) and
the artifacts of the kernel and module it runs (:class:`Artifacts`), written
after every boot and module reload.  The label keeps it apart from an ordinary
``invoke boot --detach`` guest (``patched``): :func:`vm.pipeline.boot` and the
test sessions' guest reuse match on the label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vm import errors, pipeline, runner
from vm.kernel.incremental import Artifacts
from vm.machine import guest as guest_mod
from vm.settings import Settings

STATE = "loop.json"
#: seconds a live loop guest has to answer ``true`` over SSH before it counts as stale
ALIVE_TIMEOUT = 30.0


@dataclass(frozen=True)
class LoopState:
    run_dir: Path
    pid: int
    artifacts: Artifacts | None      # what the guest runs: its kernel and the overlay module loaded

    def to_json(self) -> str:
        return json.dumps({"run_dir": str(self.run_dir), "pid": self.pid,
                           "artifacts": self.artifacts.to_dict() if self.artifacts else None}, indent=2)


def read_state(root: Path) -> LoopState | None:
    try:
        data = json.loads((root / STATE).read_text())
        return LoopState(Path(data["run_dir"]), int(data["pid"]), Artifacts.from_dict(data.get("artifacts")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_state(root: Path, g: guest_mod.Guest, artifacts: Artifacts) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{STATE}.tmp"
    tmp.write_text(LoopState(g.plan.run_dir, g.pid, artifacts).to_json())
    tmp.replace(root / STATE)


@dataclass
class Found:
    guest: guest_mod.Guest | None    # claimed by this process; None: none usable
    state: LoopState | None
    note: str                        # why there is none, or which one it is


def find(settings: Settings, root: Path, label: str) -> Found:
    """The loop guest recorded in ``root``, claimed, if it is alive and answers SSH.  A
    guest whose QEMU runs but does not answer is stale: it is stopped here."""
    state = read_state(root)
    if state is None:
        return Found(None, None, "no loop guest was started yet")
    try:
        g = guest_mod.attach(state.run_dir)
    except errors.GuestNotRunning:
        return Found(None, state, f"the loop guest (pid {state.pid}) is gone")
    if g.plan.kernel_label != label:
        return Found(None, state, f"{state.run_dir} runs {g.plan.kernel_label}, not the loop's kernel")
    if not g.claim():
        raise errors.LoopGuestBusy(label=label, pid=g.pid)
    try:
        g.run(["true"], timeout=ALIVE_TIMEOUT, check=True)
    except (errors.SSHUnreachable, errors.GuestCommandTimeout, errors.GuestCommandFailed) as exc:
        runner.echo(f"  the loop guest (pid {g.pid}) is stale ({exc}); stopping it")
        g.stop()
        g.release()
        return Found(None, state, f"the loop guest (pid {g.pid}) was stale (no answer over SSH)")
    return Found(g, state, f"loop guest pid {g.pid}")


def stop_if_stale(settings: Settings, root: Path, label: str, built: Artifacts) -> None:
    """Stop an idle loop guest that does not run ``built`` (a test session would reuse it)."""
    state = read_state(root)
    if state is None or state.artifacts == built:
        return
    for g in pipeline.running_guests(settings):
        if g.plan.run_dir == state.run_dir and g.plan.kernel_label == label and g.claim():
            runner.echo(f"  stopping the loop guest (pid {g.pid}): it runs an older build")
            g.stop()
            g.release()
