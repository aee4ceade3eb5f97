"""The tests stage's counts: passed, failed, errors and skipped per test file, from pytest's JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict


def junit_counts(xml_path: str) -> dict[str, dict[str, int]]:
    """{test file: {passed, failed, errors, skipped}} from a pytest JUnit XML report."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        # pytest writes classname "tests.test_x" (or "tests.test_x.TestClass") and, with junit_family=xunit1, file
        # a collection error has an empty classname and the module in its name
        file = case.get("file") or _file_of_classname(case.get("classname") or case.get("name", ""))
        if case.find("failure") is not None:
            outcome = "failed"
        elif case.find("error") is not None:
            outcome = "errors"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[file][outcome] += 1
    return dict(counts)


def _file_of_classname(classname: str) -> str:
    """"tests.test_x" or "tests.test_x.TestClass" -> "tests/test_x.py" (pytest's JUnit classname)."""
    parts = classname.split(".")
    for i, part in enumerate(parts):
        if part.startswith("test_") or part.endswith("_test"):
            return "/".join(parts[: i + 1]) + ".py"
    return classname


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    lines = []
    total = defaultdict(int)
    for file in sorted(counts):
        c = counts[file]
        lines.append(f"{file}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
        for k, v in c.items():
            total[k] += v
    lines.append(f"all: {total['passed']} passed, {total['failed']} failed, {total['errors']} errors, "
                 f"{total['skipped']} skipped")
    return "\n".join(lines)
