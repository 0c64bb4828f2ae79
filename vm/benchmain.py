"""`invoke bench`: run the selected measurements, print the table, write results/bench.json."""

from __future__ import annotations

from pathlib import Path

from vm import bench, benchcmp, benchrun, benchsuite, errors, runner
from vm.settings import Settings

#: measurement name -> (function, the rows it gives when it fails: their name)
STEPS = {
    bench.COLD: (benchrun.cold, "build: cold"),
    "build": (benchrun.incremental, "build: incremental"),
    "boot": (lambda b: benchrun.boot_in_process(b) + benchrun.boot_processes(b), benchrun.BOOT),
    "bare": (benchcmp.bare, "floor: bare QEMU to root-mount panic"),
    "vng": (benchcmp.vng, benchcmp.VNG),
    "scenario": (benchsuite.scenario, "scenario: one row broken down"),
    "suite": (benchsuite.whole_suite, "suite on P"),
    "edit": (benchsuite.edit_to_verdict, "edit-to-verdict"),
}


def run(settings: Settings, names: tuple[str, ...], repeat: int, dev_tree: Path | None = None) -> tuple[list[bench.Row], Path]:
    """Every selected measurement in table order; one that fails becomes a row saying why
    (its one-line error), the others still run.  Returns the rows and bench.json's path."""
    if repeat < 1:
        raise errors.BadArgument(what=f"--repeat {repeat}", fix="use --repeat 1 or more")
    if dev_tree is not None and not (dev_tree / "fs" / "overlayfs").is_dir():
        raise errors.BadArgument(what=f"--dev-tree {dev_tree} is not a kernel tree (no fs/overlayfs/)",
                                 fix="pass the series worktree of `invoke series checkout`")
    b = benchrun.Bench(settings, repeat, dev_tree, settings.results_dir / "bench")
    b.out.mkdir(parents=True, exist_ok=True)
    rows: list[bench.Row] = []
    for name in names:
        fn, label = STEPS[name]
        with runner.phase(f"bench {name} (x{repeat})"):
            try:
                rows += fn(b)
            except errors.HarnessError as exc:
                rows.append(bench.not_run(label, f"failed: {exc}"))
    path = bench.write_json(settings.results_dir / "bench.json", rows,
                            bench.host_facts(b.accel or "no guest booted", b.kernels), repeat)
    return rows, path
