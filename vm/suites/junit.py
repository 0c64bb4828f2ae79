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
    return [case_of(node) for node in ET.parse(path).getroot().iter("testcase")]


def case_of(case: ET.Element) -> Case:
    """One ``<testcase>`` element as a :class:`Case`."""
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            message = (node.get("message") or node.text or "").strip().splitlines()[:1]
            message = _EXC_PREFIX.sub("", message[0] if message else "", count=1)
            return Case(case.get("name", ""), {"failure": "failed"}.get(tag, tag), message)
    return Case(case.get("name", ""), "passed", "")


def outcomes(path: Path) -> dict[str, str]:
    """``{"test_row[wb-error-seen-xfs-patched]": "failed" | "passed" | "skipped"}``."""
    return {c.name: ("failed" if c.outcome == "error" else c.outcome) for c in cases(path)}
