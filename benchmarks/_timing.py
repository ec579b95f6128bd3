"""Shared helpers for the benchmark scripts: header, device handling, interleaved timing, tables.

Not a benchmark itself. The scripts import it as ``_timing`` (Python puts the script's folder,
``benchmarks/``, first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
NO_GPU = "not measured (no GPU)"


def integer_from(text: str, least: int) -> int:
    """An argparse type's value: an integer >= ``least`` (a usage error, not a traceback mid-run, for 0 or -1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= {least}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return integer_from(text, 1)


def count_or_zero(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return integer_from(text, 0)


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (``8,128,512``)."""
    return [count(item) for item in text.split(",")]


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a number > 0")
    return value


def setup_env() -> None:
    """Let ``import optimlab`` work without an install and point MNIST at the shared copy by default."""
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    os.environ.setdefault("MNIST_ROOT", str(REPO.parent / "shared" / "data"))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_header(title: str) -> None:
    """Title, date, versions and the devices this process can measure."""
    import lightning

    print(f"# {title}")
    print(f"date:      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"torch:     {torch.__version__}    lightning: {lightning.__version__}    "
          f"python: {platform.python_version()}")
    print(f"cpu:       {cpu_name()} ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        print(f"cuda:      {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print(f"cuda:      CUDA rows {NO_GPU}")
    print()


def devices_to_measure(choice: str = "all") -> list[torch.device]:
    """``all``: the CPU, plus CUDA when available; ``auto``: CUDA when available, else the CPU;
    ``cpu`` / ``cuda``: that one (``cuda`` without a GPU is an error)."""
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False")
    names = {"all": ["cpu", "cuda"] if has_cuda else ["cpu"], "auto": ["cuda" if has_cuda else "cpu"],
             "cpu": ["cpu"], "cuda": ["cuda"]}[choice]
    return [torch.device(n) for n in names]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads finished work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_runs(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each named measurement ``repeats`` times, round-robin (a, b, c, a, b, c, ...), so
    machine noise hits every one alike; return every value, in order. Warm-up is the caller's job."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """``interleaved_runs``, reduced to each measurement's median."""
    return {name: statistics.median(vs) for name, vs in interleaved_runs(measures, repeats).items()}


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum of the ratios of values measured side by side (round ``i`` of
    ``interleaved_runs``): a slow spell of the machine hits both members of a pair, so their ratio
    is steadier than the ratio of the two medians."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def verdict(value: float, target: float) -> str:
    """PASS when ``value <= target``."""
    return "PASS" if value <= target else "FAIL"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
