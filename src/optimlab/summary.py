"""A run's ``summary.json``: written atomically after every epoch and at the end, so an
interrupted or killed run still leaves a readable record."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null: strict JSON readers (and jq) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def is_complete(run_dir: Path) -> bool:
    """True when the run finished (trained all epochs, stopped early or diverged) and was tested."""
    summary = read_summary(run_dir)
    return bool(summary and summary.get("status") in ("complete", "diverged"))
