"""Review finding 2: is the overlay boot id made from a seeded RNG?

The boot id in every volatile checkpoint must be unpredictable and never
repeat across boots.  If overlayfs is built in, ``ovl_init()`` runs as an
initcall, before the RNG is seeded when neither the CPU nor the boot loader
is trusted for entropy (``random.trust_cpu=off random.trust_bootloader=off``);
a boot id made there comes from an unseeded crng.  The series makes it on
first use instead, after ``wait_for_random_bytes()``.

The boot-id kernel (``kconfig/boot-rng.config``: overlayfs built in, kprobe
events) boots with :data:`CMDLINE`: two boot-time kprobe events record
``ovl_init()`` and every ``uuid_gen()`` call, with the caller and the value
of ``crng_init`` at that moment.  :func:`parse_trace` reads the trace buffer
(saved logs in tests/data/rng), :func:`problems` judges it:

- the positive control: ``ovl_init()`` ran while the crng was not ready,
  so the test sees the situation the finding is about;
- a ``uuid_gen()`` called from overlayfs (``ovl_*``) happened at all (the
  probe saw the boot id being made), and every one found the crng ready.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "ovlrng"
#: drivers/char/random.c: CRNG_EMPTY 0, CRNG_EARLY 1, CRNG_READY 2
CRNG_READY = 2
#: boot-time kprobe events (Documentation/trace/kprobetrace.rst, "Kernel Boot Parameter"):
#: ``+0($stack)`` is the return address at a function's entry on x86_64, i.e. the caller
PROBES = (f"p:{GROUP}/init,ovl_init,crng=@crng_init:s32",
          f"p:{GROUP}/uuid,uuid_gen,caller=+0($stack):symbol,crng=@crng_init:s32")
#: ``trace_clock=global``: without a trace clock given, an unstable sched_clock (TCG) makes the
#: kernel switch to it at late_initcall, which empties the trace buffer and the initcall's events
CMDLINE = ("random.trust_cpu=off", "random.trust_bootloader=off", "trace_clock=global",
           "kprobe_event=" + ";".join(PROBES))
TRACE = "/sys/kernel/tracing/trace"
#: the kernel options the boot-id kernel must have (checked against its .config)
REQUIRED = ("CONFIG_OVERLAY_FS=y", "CONFIG_KPROBE_EVENTS=y", "CONFIG_KALLSYMS_ALL=y")

_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+): (?P<event>\w+): \((?P<at>[^)]*)\)(?P<args>.*)$")
_ARG = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class Hit:
    """One probe event from the trace buffer."""

    event: str          # "init" or "uuid"
    at: str             # the probed function, e.g. "uuid_gen+0x0/0x20"
    caller: str         # "ovl_get_boot_id+0x4a/0xb0" for "uuid"; "" for "init"
    crng: int           # crng_init when the probe fired
    seconds: float      # trace timestamp

    @property
    def from_overlay(self) -> bool:
        return self.caller.startswith("ovl_")

    def __str__(self) -> str:
        who = f" from {self.caller}" if self.caller else ""
        return f"{self.at.split('+')[0]}{who} at {self.seconds:.6f}s with crng_init={self.crng}"


def parse_trace(text: str) -> list[Hit]:
    """The probe events of :data:`GROUP` in a ``/sys/kernel/tracing/trace`` dump; comments skipped."""
    hits = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m or m["event"] not in ("init", "uuid"):
            continue
        args = dict(_ARG.findall(m["args"]))
        if "crng" not in args:
            continue
        hits.append(Hit(m["event"], m["at"], args.get("caller", ""), int(args["crng"]), float(m["ts"])))
    return hits


def problems(hits: list[Hit]) -> list[str]:
    """Why ``hits`` do not show a boot id made from a seeded RNG (empty: they do)."""
    out = []
    inits = [h for h in hits if h.event == "init"]
    if not inits:
        out.append("no ovl_init() event: overlayfs is not built in, or the kprobe_event= probes "
                   "were not set up (see the console log)")
    elif all(h.crng >= CRNG_READY for h in inits):
        out.append(f"ovl_init() ran with the crng already ready ({inits[0]}): this boot cannot show "
                   "the finding; boot without a seeded RNG (random.trust_cpu=off random.trust_bootloader=off)")
    made = [h for h in hits if h.event == "uuid" and h.from_overlay]
    if not made:
        out.append("no uuid_gen() call from overlayfs was seen: the volatile mount made no boot id")
    out += [f"boot id made from an unseeded RNG: uuid_gen() {h}" for h in made if h.crng < CRNG_READY]
    return out
