"""One shard of ``invoke ci`` in a lane: ``python -m vm.lanechild PLAN_FILE SHARD``.

:mod:`vm.lanes` starts it (cwd: the checkout) with the plan file the parent
wrote (``results/shards/lanes.json``: its settings, the tier's phases); it runs
:func:`vm.ci.run_shard` for that shard, exactly as ``invoke ci --shard NAME``
would, and exits with the shard's verdict: 0, or the error's exit code after
one line naming it (130 when stopped).  A module of its own because it imports
:mod:`vm.ci`, which imports :mod:`vm.lanes`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from vm import ci, errors, lanes, runner


def main(argv: Sequence[str]) -> int:
    """Run one shard of the plan the parent wrote; the exit status is the shard's verdict."""
    if len(argv) != 2:
        print(f"usage: python -m {lanes.CHILD_MODULE} PLAN_FILE SHARD (`invoke ci` starts it)", file=sys.stderr)
        return 2
    lanes.die_with_parent()
    try:
        with runner.sigterm_interrupts():
            plan = lanes.Plan.read(Path(argv[0]))
            phases = [ci.Phase.from_dict(p) for p in plan.phases]
            ci.run_shard(plan.settings, ci.pick(phases, argv[1]), phases, plan.full, tagged=False)
    except errors.HarnessError as exc:
        print(errors.one_line(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
