"""Wall time of the whole regime suite, end to end, as one ``train.py -m`` subprocess.

Runs ``python train.py -m experiment=<every conf/experiment/*.yaml> hydra.sweep.dir=<dir>
trainer.progress_bar=false [extra overrides]`` from the repository root, times it, then reads
each job's ``summary.json`` and prints one row per experiment. The subprocess's output is
streamed and also saved to ``<dir>/suite.log``.

    python benchmarks/suite.py                                     # the full suite (long on a CPU)
    python benchmarks/suite.py --experiments baseline,slow --extra "epochs=1 data.subset=1000"
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _timing

_timing.setup_env()  # MNIST_ROOT defaults to the shared copy; the subprocess inherits it

SUITE_TARGET_S = 300.0  # the full suite on an H100


def all_experiments() -> list[str]:
    return sorted(p.stem for p in (_timing.CONF / "experiment").glob("*.yaml"))


def run_suite(experiments: list[str], extra: list[str], out: Path, quiet: bool) -> tuple[int, float]:
    """Run the sweep as one subprocess; return its exit code and wall seconds."""
    cmd = [sys.executable, "train.py", "-m", f"experiment={','.join(experiments)}", f"hydra.sweep.dir={out}",
           "trainer.progress_bar=false", *extra]
    print("command:  " + shlex.join(cmd))
    print(f"log:      {out / 'suite.log'}\n", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for stop in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C (the sweep, in a session of its own, gets none)
        signal.signal(stop, signal.default_int_handler)
    start = time.perf_counter()
    # its own session: a Ctrl-C reaches it once, passed on below (the terminal's and ours would be two stops)
    with (out / "suite.log").open("w") as log, subprocess.Popen(
            cmd, cwd=_timing.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                if not quiet:
                    print("  | " + line, end="", flush=True)
        except KeyboardInterrupt:  # stop the sweep too, once: a second Ctrl-C must not cut its records short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            proc.send_signal(signal.SIGINT)
            log.writelines(proc.stdout)  # its last lines: the job it marked interrupted
            proc.wait()
            print(f"\ninterrupted: the sweep stopped (exit {proc.returncode}); its runs so far are in {out}; "
                  f"continue them with: cd {_timing.REPO} && {shlex.join([*cmd, 'resume=auto'])}", file=sys.stderr)
            sys.exit(130)
    return proc.returncode, time.perf_counter() - start


def read_jobs(out: Path) -> list[dict[str, Any]]:
    """Every job's summary under ``out``, in job order (the sweep subdirectories start with the job number)."""
    def job_number(path: Path) -> int:
        head = path.parent.name.split("_", 1)[0]
        return int(head) if head.isdigit() else sys.maxsize

    return [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"), key=job_number)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", default=None,
                        help="comma-separated subset of conf/experiment/ (default: all of them)")
    parser.add_argument("--extra", default="", help='extra overrides for every job, e.g. "epochs=1 data.subset=1000"')
    parser.add_argument("--out", type=Path, default=None, help="sweep directory (default: a new temporary one)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the subprocess's output (still logged)")
    args = parser.parse_args()
    known = all_experiments()
    experiments = args.experiments.split(",") if args.experiments else known
    unknown = [e for e in experiments if e not in known]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    out = (args.out or Path(tempfile.mkdtemp(prefix="optimlab-suite-"))).resolve()
    if any(out.glob("*/summary.json")):
        parser.error(f"{out} already holds runs; choose an empty or new --out")
    full = experiments == known and not args.extra

    _timing.print_header("regime suite: train.py -m over conf/experiment/, end to end")
    print(f"{len(experiments)} experiment(s): {', '.join(experiments)}; extra overrides: {args.extra or 'none'}")
    print("(the jobs run on whatever trainer.accelerator=auto picks: the GPU when there is one)")
    code, wall = run_suite(experiments, shlex.split(args.extra), out, args.quiet)

    jobs = read_jobs(out)
    rows = [[(j.get("description") or {}).get("name"), f"{j.get('epochs_completed')}/{(j.get('config') or {}).get('epochs')}",
             j.get("wall_time_s"), j.get("steps_per_s"), j.get("test_acc"), j.get("regime"), j.get("status")]
            for j in jobs]
    print()
    _timing.print_table(["experiment", "epochs", "wall_time_s", "steps_per_s", "test_acc", "regime", "status"], rows)
    jobs_s = sum(j.get("wall_time_s") or 0.0 for j in jobs)
    print(f"\ntotal wall time: {wall:.1f} s ({jobs_s:.1f} s inside the jobs' run(), the rest is start-up "
          f"and Hydra); exit code {code}; {len(jobs)}/{len(experiments)} summaries; runs kept in {out}")
    if full:
        where = "measured on " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "a CPU, not an H100")
        print(f"target: full suite < {SUITE_TARGET_S:.0f} s on an H100: "
              f"{_timing.verdict(wall, SUITE_TARGET_S)} ({where})")
    else:
        print(f"target (full suite < {SUITE_TARGET_S:.0f} s on an H100): n/a, reduced suite")
    if code != 0 or len(jobs) != len(experiments):
        sys.exit(code or 1)


if __name__ == "__main__":
    main()
