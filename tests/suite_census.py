"""A suite's self-count: every declared test (and parametrised case) must be collected, none skipped.

A renamed, deleted or skipped test otherwise drops out of a suite silently; the last test of
tests/test_robustness.py and tests/test_security_api.py calls ``assert_suite_collected``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType


def declared_cases(function) -> int:
    """How many test items a test function expands to (product of its parametrize lists)."""
    count = 1
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize":
            count *= len(mark.args[1])
    return count


def all_marks(function) -> set[str]:
    """Names of the marks on a test function and on any of its parametrised cases."""
    marks = list(getattr(function, "pytestmark", []))
    for mark in list(marks):
        if mark.name == "parametrize":
            for value in mark.args[1]:
                marks.extend(getattr(value, "marks", ()))
    return {m.name for m in marks}


def assert_suite_collected(request, module: ModuleType, required_cases: dict[str, int], minimum_total: int = 1) -> None:
    """Fail unless the module's tests are exactly ``required_cases`` (name -> minimum cases), none is
    marked skip/skipif/xfail or calls pytest.skip, and (without -k or a test id) all were collected."""
    tests = {name: fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)}
    assert set(tests) == set(required_cases), "a test was added, renamed or removed: update REQUIRED_CASES"
    for name, minimum in required_cases.items():
        assert declared_cases(tests[name]) >= minimum, f"{name} lost cases"
        marks = all_marks(tests[name])
        assert not marks & {"skip", "skipif", "xfail"}, f"{name} is marked {marks}"
        assert "pytest." + "skip(" not in inspect.getsource(tests[name]), f"{name} skips itself"
    total = sum(declared_cases(fn) for fn in tests.values())
    assert total >= minimum_total
    collected = [item for item in request.session.items if item.path == Path(module.__file__)]
    narrowed = request.config.option.keyword or any("::" in arg for arg in request.config.args)
    if not narrowed:  # with -k or a test id only a subset is collected, by design
        assert len(collected) == total
