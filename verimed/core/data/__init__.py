"""Dataset loaders (OSCE cases, HealthBench, MCQ) with per-record validation.

Every loader reads JSONL, validates each record and either stops with
``DataError("FILE:LINE: FIELD: problem")`` or, with ``skip_invalid=True``,
skips the record and counts it in ``LoadReport.skipped``.

May import: ``verimed.core.types`` only.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import msgspec

T = TypeVar("T")


class DataError(ValueError):
    """A malformed data record: the message is ``file:line: field: problem``."""


class LoadReport(msgspec.Struct):
    path: str
    loaded: int = 0
    skipped: int = 0
    errors: list[str] = []


def shipped(name: str) -> Path:
    """Path of a data file shipped inside the package (``verimed/data``)."""
    return Path(str(resources.files("verimed.data").joinpath(name)))


def read_jsonl(
    path: str | Path,
    parse: Callable[[dict[str, Any], int], T],
    skip_invalid: bool = False,
) -> tuple[list[T], LoadReport]:
    """Parse each line of ``path`` with ``parse(record, line_no)``.

    ``parse`` raises ``RecordError(field, problem)``; it is turned into a
    ``DataError`` naming the file and line (or skipped and counted).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    report = LoadReport(path=str(path))
    items: list[T] = []
    for line_no, line in _lines(path):
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError("<json>", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise RecordError("<record>", f"expected a JSON object, got {type(record).__name__}")
            items.append(parse(record, line_no))
            report.loaded += 1
        except RecordError as exc:
            message = f"{path}:{line_no}: {exc.field}: {exc.problem}"
            if not skip_invalid:
                raise DataError(message) from None
            report.skipped += 1
            report.errors.append(message)
    return items, report


class RecordError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, line


def require(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``record[key]`` checked to be of ``kind``; raises RecordError naming ``where.key``."""
    field = f"{where}.{key}" if where else key
    if key not in record:
        raise RecordError(field, "missing required field")
    value = record[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(field, f"expected {names}, got {type(value).__name__}")
    return value
