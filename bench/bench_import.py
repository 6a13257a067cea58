#!/usr/bin/env python3
"""How long ``import atropos_slurm`` takes, next to the standard-library modules it could pull in.

Each measurement is a fresh interpreter running ``python -X importtime -c "import NAME"``: the
module's cumulative line (its own body plus every module it imported first), in ms, median of
``--repeats`` runs.  That is wall time; on a loaded machine it grows with the load, so a second
column gives the CPU time the import costs: the interpreter's CPU time (user + system) minus
that of one running ``pass``, medians.  The module is imported from a copy in a temporary directory whose
``__pycache__`` is written once first (``PYTHONDONTWRITEBYTECODE`` unset), as after
``pip install`` or on a cluster's second run; ``--cold`` also shows it compiled from source
every time (what a read-only copy with ``PYTHONDONTWRITEBYTECODE=1`` costs).

    python3 bench/bench_import.py [--repeats 21] [--cold] [--baseline OLD/atropos_slurm.py] [--instructions]

``--instructions`` also counts the instructions of each import under valgrind's callgrind
(minus those of ``pass``): the same on a loaded machine as on a quiet one.

Prints a table: the module, ``--baseline`` (another version of it, e.g. ``git show
main:atropos_slurm.py > /tmp/old.py``), ``import asyncio`` alone (what ``atropos_slurm`` loads on
first use of the event loop), each against asyncio.  The runs alternate between them, so
other load on the machine weighs on all alike.  Target (issue 19): ``atropos_slurm`` warm
<= 30 ms on this 2-core machine.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(os.path.dirname(HERE), "atropos_slurm.py")
TARGET_MS = 30.0


def import_ms(name: str, cwd: str, env: dict) -> float:
    """``name``'s cumulative import time in a fresh interpreter, in ms."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {name}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"import {name} failed:\n{proc.stderr[-2000:]}")
    lines = [line.split("|") for line in proc.stderr.splitlines() if line.startswith("import time:")]
    cumulative = [int(cols[1]) for cols in lines if len(cols) == 3 and cols[2].strip() == name]
    return cumulative[-1] / 1000.0 if cumulative else 0.0  # 0: already loaded by site


def cpu_ms(statement: str, cwd: str, env: dict) -> float:
    """CPU time (user + system) of a fresh interpreter running ``statement``, in ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", statement], cwd=cwd, env=env, check=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000.0


def instructions(statement: str, cwd: str, env: dict) -> int:
    """Instructions a fresh interpreter executes for ``statement`` (callgrind's total)."""
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           os.path.realpath(sys.executable), "-c", statement],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    found = [line.split()[-1] for line in proc.stderr.splitlines() if "Collected :" in line]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"valgrind failed (apt-get install valgrind):\n{proc.stderr[-2000:]}")
    return int(found[-1])


def copy_of(module: str, parent: str, label: str) -> str:
    """A directory holding ``module`` as ``atropos_slurm.py``, its bytecode written once."""
    path = os.path.join(parent, label)
    os.mkdir(path)
    shutil.copy(module, os.path.join(path, "atropos_slurm.py"))
    subprocess.run([sys.executable, "-c", "import atropos_slurm"], cwd=path, env=warm_env(), check=True)
    return path


def warm_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cold", action="store_true", help="also time the import compiled from source each time")
    parser.add_argument("--module", default=MODULE, help="the atropos_slurm.py to time (default: this checkout's)")
    parser.add_argument("--baseline", help="another atropos_slurm.py to time alongside")
    parser.add_argument("--instructions", action="store_true", help="also count instructions (valgrind)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-import-")
    try:
        env = warm_env()
        cases = [("import atropos_slurm (bytecode cached)", "atropos_slurm", copy_of(args.module, tmp, "new"), env)]
        if args.baseline:
            cases.append(("baseline: " + os.path.basename(args.baseline) + " (bytecode cached)", "atropos_slurm",
                          copy_of(args.baseline, tmp, "old"), env))
        cases.append(("import asyncio alone", "asyncio", tmp, env))
        if args.cold:
            cold = os.path.join(tmp, "cold")
            os.mkdir(cold)
            shutil.copy(args.module, os.path.join(cold, "atropos_slurm.py"))
            cases.append(("import atropos_slurm (compiled each time)", "atropos_slurm", cold,
                          dict(env, PYTHONDONTWRITEBYTECODE="1")))
        times = {label: [] for label, *_ in cases}
        cpu = {label: [] for label, *_ in cases + [("pass", None, None, None)]}
        for _ in range(args.repeats):  # alternating: load on the machine weighs on every case alike
            cpu["pass"].append(cpu_ms("pass", tmp, env))
            for label, name, cwd, case_env in cases:
                times[label].append(import_ms(name, cwd, case_env))
                cpu[label].append(cpu_ms(f"import {name}", cwd, case_env))
        counts = {}
        if args.instructions:
            floor = instructions("pass", tmp, env)
            counts = {label: instructions(f"import {name}", cwd, case_env) - floor
                      for label, name, cwd, case_env in cases}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {label: statistics.median(values) for label, values in times.items()}
    cpu_medians = {label: statistics.median(values) - statistics.median(cpu["pass"])
                   for label, values in cpu.items() if label != "pass"}
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.repeats} fresh interpreters each, alternating (-X importtime, cumulative)\n")
    print("| what | ms (-X importtime) | CPU ms | vs asyncio alone (ms, CPU) |")
    print("|---|---|---|---|")
    base, base_cpu = medians["import asyncio alone"], cpu_medians["import asyncio alone"]
    for label, ms in medians.items():
        ratio = f"{ms / base:.2f}x, {cpu_medians[label] / base_cpu:.2f}x"
        print(f"| {label} | {ms:.1f} | {cpu_medians[label]:.1f} | {ratio} |")
    if counts:
        print("\n| what | instructions (callgrind, minus `pass`) | vs asyncio alone |")
        print("|---|---|---|")
        for label, count in counts.items():
            print(f"| {label} | {count / 1e6:.1f} M | {count / counts['import asyncio alone']:.2f}x |")
    warm = medians[cases[0][0]]
    print(f"\ntarget: import atropos_slurm (bytecode cached) <= {TARGET_MS:.0f} ms: "
          f"{'PASS' if warm <= TARGET_MS else 'FAIL'} ({warm:.1f} ms)")
    return 0 if warm <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
