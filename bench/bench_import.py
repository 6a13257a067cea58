#!/usr/bin/env python3
"""How long ``import atropos_slurm`` takes, next to the standard-library modules it could pull in.

Each measurement is a fresh interpreter running ``python -X importtime -c "import NAME"``: the
module's cumulative line (its own body plus every module it imported first), in ms, median of
``--repeats`` runs.  The module is imported from a copy in a temporary directory whose
``__pycache__`` is written once first (``PYTHONDONTWRITEBYTECODE`` unset), as after
``pip install`` or on a cluster's second run; ``--cold`` also shows it compiled from source
every time (what a read-only copy with ``PYTHONDONTWRITEBYTECODE=1`` costs).

    python3 bench/bench_import.py [--repeats 21] [--cold] [--module path/to/atropos_slurm.py]

Prints a table: the module, ``import asyncio`` alone (what ``atropos_slurm`` loads on first
use of the event loop), and the ratio of the two.  Target (issue 19): ``atropos_slurm`` warm
<= 30 ms on this 2-core machine.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(os.path.dirname(HERE), "atropos_slurm.py")
TARGET_MS = 30.0


def import_ms(name: str, cwd: str, env: dict, repeats: int) -> float:
    """Median over ``repeats`` fresh interpreters of ``name``'s cumulative import time, in ms."""
    times = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {name}"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"import {name} failed:\n{proc.stderr[-2000:]}")
        lines = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
        cumulative = [int(cols[1]) for cols in lines if len(cols) == 3 and cols[2].strip() == name]
        times.append(cumulative[-1] / 1000.0 if cumulative else 0.0)  # 0: already loaded by site
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cold", action="store_true", help="also time the import compiled from source each time")
    parser.add_argument("--module", default=MODULE, help="the atropos_slurm.py to time (default: this checkout's)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-import-")
    try:
        shutil.copy(args.module, os.path.join(tmp, "atropos_slurm.py"))
        warm_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
        subprocess.run([sys.executable, "-c", "import atropos_slurm"], cwd=tmp, env=warm_env, check=True)
        rows = [("import atropos_slurm (bytecode cached)", import_ms("atropos_slurm", tmp, warm_env, args.repeats)),
                ("import asyncio alone", import_ms("asyncio", tmp, warm_env, args.repeats))]
        if args.cold:
            cold_env = dict(warm_env, PYTHONDONTWRITEBYTECODE="1")
            shutil.rmtree(os.path.join(tmp, "__pycache__"))
            rows.append(("import atropos_slurm (compiled each time)",
                         import_ms("atropos_slurm", tmp, cold_env, args.repeats)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, median of {args.repeats} fresh interpreters "
          f"(-X importtime, cumulative)\n")
    print("| what | ms | vs asyncio alone |")
    print("|---|---|---|")
    asyncio_ms = rows[1][1]
    for what, ms in rows:
        print(f"| {what} | {ms:.1f} | {ms / asyncio_ms:.2f}x |")
    warm = rows[0][1]
    print(f"\ntarget: import atropos_slurm (bytecode cached) <= {TARGET_MS:.0f} ms: "
          f"{'PASS' if warm <= TARGET_MS else 'FAIL'} ({warm:.1f} ms)")
    return 0 if warm <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
