"""Client instructions per request under callgrind: ours (both routings) vs the bare loop, deterministic.

CPU time on a shared 2-core VM moves by up to 2x between back-to-back runs (bench/RESULTS.md);
the number of instructions the client executes per request does not.  Each client runs twice
under ``valgrind --tool=callgrind`` (user-space instructions), once for 1,024 and once for
3,072 measured requests after the same warm-up, and the difference is divided by 2,048, so
that start-up and warm-up cancel.  The server is ``bench_dispatch.py``'s fast canned-answer
server in its own process (not under valgrind).

    python3 bench/count_instructions.py                      # bare, round-robin and prefix, 64 in flight, 1 server, ~2 min
    python3 bench/count_instructions.py --module old.py      # also another version of atropos_slurm.py
    python3 bench/count_instructions.py --servers 4096 --concurrency 512   # the scale check (~20 min)

Needs ``valgrind`` (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_dispatch as bd  # noqa: E402

# One client run, in the process valgrind starts: warm-up, then ``requests`` measured requests.
WORKER = """
import asyncio, importlib.util, sys
sys.path[:0] = [{root!r}, {here!r}]
spec = importlib.util.spec_from_file_location("atropos_slurm", {module!r})
module = importlib.util.module_from_spec(spec)
sys.modules["atropos_slurm"] = module
spec.loader.exec_module(module)
# Valgrind runs the client ~50x slower: at thousands of servers each connection would sit idle
# past the pool's POOL_IDLE_SECONDS between two requests and be dropped, so every request would
# connect anew, which no real run at that size does.  The time dilation is undone here.
module.POOL_IDLE_SECONDS = 3600.0
import bench_dispatch as bd

async def main(requests, client, urls, concurrency):
    one, close = await bd.make_client(client, urls, concurrency)
    await bd.run_load(one, concurrency, max(2 * concurrency, 2 * len(urls), 1024))
    await bd.run_load(one, concurrency, requests)
    await close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])))
"""


def instructions(client: str, module: str, urls, concurrency: int, requests: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER.format(root=ROOT, here=HERE, module=os.path.abspath(module)))
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable,
                               script, str(requests), client, ",".join(urls), str(concurrency)],
                              capture_output=True, text=True, timeout=1800)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or not found:
            raise SystemExit(f"count_instructions: the {client} run failed:\n{done.stderr[-2000:]}")
        return int(found.group(1))


def per_request(client: str, module: str, urls, concurrency: int) -> float:
    return (instructions(client, module, urls, concurrency, 3072)
            - instructions(client, module, urls, concurrency, 1024)) / 2048


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--module", action="append", default=[], metavar="FILE",
                   help="another atropos_slurm.py to count as well (repeatable)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("count_instructions: valgrind is not installed (Debian: apt-get install valgrind)")
    # Under valgrind (~50x slower) thousands of first connects can outlast the connect timeout;
    # they are retried, and the manager's retry budget would refuse most of those retries: the
    # warm-up is not what is measured, so the budget is lifted for the counted clients.
    os.environ.setdefault("ATROPOS_SLURM_RETRY_BUDGET", "1000")
    server = bd.ServerProcess("fast", args.servers, 0.0)
    try:
        here = os.path.join(ROOT, "atropos_slurm.py")
        rows = [("bare loop", "bare", here), ("ours, routing=round_robin", "ours_rr", here),
                ("ours (this checkout, routing=prefix)", "ours", here)]
        rows += [(f"ours ({m})", "ours", m) for m in args.module]
        print(f"client instructions per request (callgrind, user space), {args.servers} server(s), "
              f"{args.concurrency} in flight, Python {sys.version.split()[0]}\n")
        print("| client | instructions / request | vs bare loop | vs round-robin |\n|---|---:|---:|---:|")
        bare = round_robin = None
        for label, client, module in rows:
            count = per_request(client, module, server.urls, args.concurrency)
            bare = bare or count
            round_robin = round_robin or (count if client == "ours_rr" else None)
            versus = f"{count / round_robin:.2f}×" if round_robin else ""
            print(f"| {label} | {count / 1000:.1f}k | {count / bare:.2f}× | {versus} |", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
