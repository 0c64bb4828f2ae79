"""Reading JUnit XML written by pytest."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

#: the exception class pytest puts before a message: "vm.errors.ExpectationFailed: ", "Failed: "
_EXC_PREFIX = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?:[A-Z]\w*(?:Error|Failed|Exception)|Failed): ")


@dataclass(frozen=True)
class Case:
    name: str          # "test_row[wb-error-seen-xfs-patched]"
    outcome: str       # passed | failed | error | skipped
    message: str = ""  # first line of the failure, error or skip message


def cases(path: Path) -> list[Case]:
    """Every test case, telling a failed test from one whose setup errored."""
    found = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0] if message else ""
                message = _EXC_PREFIX.sub("", message, count=1)
                break
        found.append(Case(case.get("name", ""), outcome, message))
    return found


def outcomes(path: Path) -> dict[str, str]:
    """``{"test_row[wb-error-seen-xfs-patched]": "failed" | "passed" | "skipped"}``."""
    return {c.name: ("failed" if c.outcome == "error" else c.outcome) for c in cases(path)}
