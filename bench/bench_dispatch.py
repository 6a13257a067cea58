"""Dispatch benchmark: the same loopback load through five HTTP clients.

Clients (each run in a fresh process, so that its CPU time is its own):

  ours      atropos_slurm.ServerManager (this repository)
  atropos   atroposlib's ServerManager (Atropos itself: openai SDK + tenacity + semaphores)
  openai    openai.AsyncOpenAI, one client per server, round-robin
  aiohttp   one shared aiohttp.ClientSession, round-robin over the servers
  bare      the floor: a minimal hand-written HTTP/1.1 client over asyncio streams, one
            keep-alive connection per concurrent worker, JSON encode + decode per request

Servers run in a separate process: ``python -m atropos_slurm stub-server --count K --latency S``
(``--server fast`` swaps in a minimal canned-answer asyncio.Protocol server, to show how much
of a cell the stub server's own CPU decides).  Every request is a chat completion with a small
body; every client decodes the JSON answer.

Grid: concurrency {64, 512} x server latency {0, 50 ms} x servers {2, 8}.  Within a cell the
clients alternate (order rotated each repeat) and each cell is repeated; the table reports
medians.  Per run: requests/s, client CPU per request (``time.process_time()`` of the client
process over the measured phase, warm-up excluded), p50/p99 latency, and the server process's
CPU busy share over the same phase (read from /proc).

    bash bench/setup.sh                                        # the peers' venv
    /opt/atropos-bench-venv/bin/python bench/bench_dispatch.py            # full grid, ~10 min
    /opt/atropos-bench-venv/bin/python bench/bench_dispatch.py --quick    # smoke run, ~1 min
    ... --write bench/RESULTS.md                               # also write the results file
    ... --profile                                              # cProfile of 'ours', 0 ms / 64

Clients whose packages are missing are skipped (and said so), so ``python3
bench/bench_dispatch.py --clients ours,bare`` runs without the venv.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ALL_CLIENTS = ("ours", "atropos", "openai", "aiohttp", "bare")  # and "ours_rr" (ours, routing="round_robin") on request
NOTES_MARKER = "<!-- notes: kept by --write -->"
OTHER_LOAD_LIMIT = 0.3  # cores that the rest of the machine may use during a run before it is redone
SLOW_CLIENTS = ("atropos", "openai")  # ~500-700 req/s: fewer requests keep the run short
LABELS = {"ours": "ours (atropos_slurm)", "atropos": "Atropos ServerManager", "openai": "openai AsyncOpenAI",
          "aiohttp": "aiohttp shared session", "bare": "bare asyncio loop", "ours_rr": "ours, routing=round_robin"}
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
MAX_TOKENS = 8
MODEL = "stub"


# =============================================================================================
# Worker: one client, one run, in its own process; prints one JSON line
# =============================================================================================


def _proc_cpu(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return float("nan")


def _check(choice_text: str) -> None:
    if not choice_text.startswith("stub reply"):
        raise RuntimeError(f"unexpected answer {choice_text!r}")


async def make_client(name: str, urls, concurrency: int):
    """(request coroutine function, close coroutine function) for client ``name``."""
    if name in ("ours", "ours_rr"):
        import atropos_slurm as a
        template = a.ServerBaseline(timeout=60, model_name=MODEL, num_max_requests_at_once=max(512, concurrency))
        manager = a.ServerManager(a.configs_for_urls(template, urls),
                                  routing="round_robin" if name == "ours_rr" else None)  # None: the default

        # BENCH_DISTINCT_PROMPTS=1: a prompt of its own per request (as new conversations), for
        # the routing's cost: one prompt again and again is one hot prefix, piled and spilled.
        distinct = os.environ.get("BENCH_DISTINCT_PROMPTS") == "1"

        async def one(i):
            messages = [{"role": "user", "content": f"Say hello to the benchmark {i}."}] if distinct else MESSAGES
            resp = await manager.chat_completion(messages=messages, max_tokens=MAX_TOKENS)
            return resp.choices[0].message.content

        return one, manager.close

    if name == "atropos":
        import logging
        import warnings
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        from atroposlib.envs.server_handling.server_manager import APIServerConfig, ServerManager
        configs = [APIServerConfig(base_url=u, api_key="x", model_name=MODEL, timeout=60,
                                   num_max_requests_at_once=max(512, concurrency)) for u in urls]
        manager = ServerManager(configs)  # defaults otherwise: health_check=True, as users get it

        async def one(i):
            resp = await manager.chat_completion(messages=MESSAGES, max_tokens=MAX_TOKENS)
            return resp.choices[0].message.content

        async def close():
            for s in manager.servers:
                if getattr(s, "check_task", None) is not None:
                    s.check_task.cancel()
                await s.openai.close()

        return one, close

    if name == "openai":
        import openai
        clients = [openai.AsyncOpenAI(base_url=u, api_key="x", timeout=60) for u in urls]
        k = len(clients)

        async def one(i):
            resp = await clients[i % k].chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
            return resp.choices[0].message.content

        async def close():
            for c in clients:
                await c.close()

        return one, close

    if name == "aiohttp":
        import aiohttp
        # The default connector caps a session at 100 connections; at concurrency 512 that cap,
        # not the client, would decide the 50 ms cells.  Allow one connection per worker.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0),
                                        timeout=aiohttp.ClientTimeout(total=60))
        endpoints = [u + "/chat/completions" for u in urls]
        k = len(endpoints)

        async def one(i):
            async with session.post(endpoints[i % k], json={"model": MODEL, "messages": MESSAGES,
                                                            "max_tokens": MAX_TOKENS}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                data = json.loads(await resp.read())
            return data["choices"][0]["message"]["content"]

        return one, session.close

    if name == "bare":
        import atropos_slurm as a
        targets = [a.parse_base_url(u) for u in urls]
        conns = {}  # worker id -> (reader, writer, host header, path)

        async def one(i, worker=0):
            conn = conns.get(worker)
            if conn is None:
                _, host, port, prefix = targets[worker % len(targets)]
                reader, writer = await asyncio.open_connection(host, port)
                conn = conns[worker] = (reader, writer, f"{host}:{port}".encode(),
                                        (prefix + "/chat/completions").encode())
            reader, writer, host, path = conn
            body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}).encode()
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path, host, len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"bad answer {head[:40]!r}")
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            data = json.loads(await reader.readexactly(int(m.group(1))))
            return data["choices"][0]["message"]["content"]

        one.per_worker = True

        async def close():
            for _, writer, _, _ in conns.values():
                writer.close()

        return one, close

    raise ValueError(f"unknown client {name!r}")


async def run_load(one, concurrency: int, total: int, latencies=None):
    """``total`` requests by ``concurrency`` workers, each looping until the total is issued."""
    counter = iter(range(total))
    per_worker = getattr(one, "per_worker", False)
    perf = time.perf_counter

    async def worker(w):
        for i in counter:
            t0 = perf()
            text = await (one(i, w) if per_worker else one(i))
            if latencies is not None:
                latencies.append(perf() - t0)
            if i % 97 == 0:
                _check(text)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def worker_main(args) -> dict:
    urls = args.urls.split(",")
    one, close = await make_client(args.worker, urls, args.concurrency)
    try:
        # Warm-up: open every connection, fill caches, let the SDKs import lazily what they do.
        await run_load(one, args.concurrency, max(args.concurrency * 2, 256))
        gc.collect()
        latencies = []
        machine0, server_cpu0 = _machine_busy(), _proc_cpu(args.server_pid)
        ru0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        await run_load(one, args.concurrency, args.requests, latencies)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        sys_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_stime - ru0.ru_stime
        server_cpu, machine = _proc_cpu(args.server_pid) - server_cpu0, _machine_busy() - machine0
    finally:
        await close()
    latencies.sort()
    n = len(latencies)
    return {"client": args.worker, "requests": n, "wall": wall, "rps": n / wall, "cpu_us": cpu / n * 1e6, "sys_us": sys_cpu / n * 1e6,
            "p50_ms": latencies[n // 2] * 1e3, "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3,
            "client_busy": cpu / wall, "server_busy": server_cpu / wall, "server_cpu_us": server_cpu / n * 1e6,
            "other_busy": max(0.0, (machine - cpu - server_cpu) / wall)}


def profile_main(args) -> None:
    """cProfile of one 'ours' run; prints the top functions by own time and by cumulative time."""
    import cProfile
    import pstats

    async def main():
        urls = args.urls.split(",")
        one, close = await make_client("ours", urls, args.concurrency)
        await run_load(one, args.concurrency, 512)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        await run_load(one, args.concurrency, args.requests)
        prof.disable()
        wall = time.perf_counter() - t0
        await close()
        print(f"profiled {args.requests} requests in {wall:.2f} s (profiler overhead included)")
        for key in ("tottime", "cumulative"):
            print(f"\n--- top 30 by {key} ---")
            pstats.Stats(prof).strip_dirs().sort_stats(key).print_stats(30)

    asyncio.run(main())


# =============================================================================================
# A minimal server, to check whether the stub server decides a cell (--server fast)
# =============================================================================================


def fast_server_main(ports, latency: float) -> None:
    """Canned answers from asyncio.Protocol: no JSON work per request, pipelining not supported."""
    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                    "message": {"role": "assistant", "content": "stub reply (fast)"}}],
                       "usage": {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}}).encode()
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    health = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.t, self.buf, self.loop = transport, b"", asyncio.get_running_loop()

        def data_received(self, data):
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", self.buf[:end])
                size = end + 4 + (int(m.group(1)) if m else 0)
                if len(self.buf) < size:
                    return
                request, self.buf = self.buf[:size], self.buf[size:]
                reply = answer if request.startswith(b"POST") else health
                if latency and request.startswith(b"POST"):
                    self.loop.call_later(latency, self._send, reply)
                else:
                    self.t.write(reply)

        def _send(self, reply):
            if not self.t.is_closing():
                self.t.write(reply)

    async def main():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Proto, "127.0.0.1", p, reuse_address=True, backlog=1024) for p in ports]
        print(f"fast-server: listening on 127.0.0.1 port(s) {', '.join(str(p) for p in ports)}",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for s in servers:
            s.close()

    try:  # uvloop when the venv has it (bench/setup.sh): the server's own delays then decide less
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


# =============================================================================================
# Orchestrator
# =============================================================================================


def free_ports(count: int):
    import atropos_slurm as a
    base = a.free_port_block(count)
    return list(range(base, base + count))


class ServerProcess:
    def __init__(self, kind: str, count: int, latency: float):
        self.ports = free_ports(count)
        if kind == "stub":
            cmd = [sys.executable, "-m", "atropos_slurm", "stub-server", "--port", str(self.ports[0]),
                   "--count", str(count), "--latency", str(latency), "--keep-alive-timeout", "600"]
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--fast-server",
                   ",".join(map(str, self.ports)), "--latency", str(latency)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        line = self.proc.stderr.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.urls = [f"http://127.0.0.1:{p}/v1" for p in self.ports]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_worker(client: str, server: ServerProcess, concurrency: int, requests: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", client, "--urls", ",".join(server.urls),
           "--concurrency", str(concurrency), "--requests", str(requests), "--server-pid", str(server.proc.pid)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"client": client, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_clients(wanted):
    """The wanted clients whose packages are installed (a broken install shows up as run errors)."""
    import importlib.util
    packages = {"atropos": "atroposlib", "openai": "openai", "aiohttp": "aiohttp"}
    ok, missing = [], {}
    for c in wanted:
        if c not in LABELS:
            raise SystemExit(f"bench: unknown client {c!r} (known: {', '.join(LABELS)})")
        if c in packages and importlib.util.find_spec(packages[c]) is None:
            missing[c] = f"package {packages[c]!r} is not installed in {sys.executable} (run bench/setup.sh)"
            continue
        ok.append(c)
    return ok, missing


def wait_quiet(max_wait: float, threshold: float = OTHER_LOAD_LIMIT) -> float:
    """Wait (up to ``max_wait`` s) until the rest of the machine uses under ``threshold`` cores.

    Other processes on a 2-core machine (a test suite, a vLLM server) take CPU from both the
    client and the server and so move every number; returns the last load seen (cores).
    """
    deadline, load = time.monotonic() + max_wait, float("nan")
    while True:
        busy0, wall0 = _machine_busy(), time.perf_counter()
        time.sleep(0.5)
        load = (_machine_busy() - busy0) / (time.perf_counter() - wall0)
        if load < threshold or time.monotonic() >= deadline:
            return load


def fmt_int(x):
    return f"{x:,.0f}"


def median_of(runs, key):
    values = [r[key] for r in runs if "error" not in r]
    return statistics.median(values) if values else float("nan")


def fast_server_loop() -> str:
    """The event loop the fast server runs on (it takes uvloop when this Python has it)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio's event loop"
    return f"uvloop {uvloop.__version__}"


def build_report(cells, clients, missing, args, meta) -> str:
    out = []
    out.append("# Dispatch benchmark results\n")
    out.append(f"- date: {meta['date']}")
    out.append(f"- machine: {meta['nproc']} cores (`nproc`), {meta['cpu']}, Linux {meta['kernel']}, "
               f"Python {meta['python']}")
    out.append(f"- peers: {meta['versions']}")
    out.append(f"- command: `{meta['command']}`")
    if args.server == "stub":
        server = "`python -m atropos_slurm stub-server`"
    else:
        server = f"minimal canned-answer asyncio.Protocol server (--server fast) on {fast_server_loop()}"
    out.append(f"- server: {server}, one separate process holding all K servers; clients in a fresh process per run, "
               "on asyncio's own event loop")
    out.append(f"- load: chat completion, `max_tokens={MAX_TOKENS}`, closed loop of C workers; "
               f"{args.requests:,} measured requests per run ({args.slow_requests:,} for "
               f"{', '.join(c for c in SLOW_CLIENTS)}), at least {args.min_rounds}·C for the others, "
               f"rounded up to a multiple of C, after a warm-up of "
               f"max(2C, 256); a run in which other processes used over {OTHER_LOAD_LIMIT} cores is redone "
               f"(up to {args.redo} times, waiting up to {args.quiet_wait:g} s for quiet first; the least disturbed "
               f"run is kept); "
               f"{args.repeats} repeats per cell, clients alternating, medians shown")
    if missing:
        for c, why in missing.items():
            out.append(f"- **{c} column dropped**: {why}")
    out.append("")
    out.append("Columns per client: requests/s | client CPU µs per request | p50 / p99 latency ms. "
               "`srv` = the server process's CPU busy share during the run (1.00 = one core saturated) "
               "and its CPU µs per request, shown for the bare loop and ours. `other load` = median CPU (cores) that the rest of the machine used "
               "during the runs: anything above ~0.2 takes CPU from client and server alike.\n")
    head = "| latency, servers, concurrency | " + " | ".join(LABELS[c] for c in clients) + " | other load |"
    out.append(head)
    out.append("|---|" + "---|" * (len(clients) + 1))
    for (lat, k, conc), runs in cells.items():
        row = [f"{lat * 1000:.0f} ms, {k}, {conc}"]
        for c in clients:
            rs = runs.get(c, [])
            errs = [r["error"] for r in rs if "error" in r]
            if not rs or len(errs) == len(rs):
                row.append(f"error: {errs[0][:60]}" if errs else "-")
                continue
            cell = (f"{fmt_int(median_of(rs, 'rps'))} req/s · {fmt_int(median_of(rs, 'cpu_us'))} µs · "
                    f"{median_of(rs, 'p50_ms'):.1f} / {median_of(rs, 'p99_ms'):.1f} ms")
            if c in ("bare", "ours"):
                cell += f" · srv {median_of(rs, 'server_busy'):.2f} ({median_of(rs, 'server_cpu_us'):.0f} µs)"
            if errs:
                cell += f" ({len(errs)} failed runs)"
            row.append(cell)
        others = [r["other_busy"] for rs in runs.values() for r in rs if "error" not in r]
        row.append(f"{statistics.median(others):.2f} cores" if others else "-")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.extend(verdicts(cells, clients))
    return "\n".join(out) + "\n"


def verdicts(cells, clients):
    lines = ["## Targets\n", "| target | cell | measured | verdict |", "|---|---|---|---|"]
    have = set(clients)
    if {"ours", "bare"} <= have:
        for key, runs in cells.items():
            ours, bare = median_of(runs["ours"], "cpu_us"), median_of(runs["bare"], "cpu_us")
            ratio = ours / bare
            target = 1.5 if key[0] == 0 else 2  # issue 12: 1.5x at 0 ms (the earlier target, 2x, elsewhere)
            lines.append(f"| ours CPU/request ≤ {target:g}× bare loop | {key[0]*1000:.0f} ms, {key[1]}, {key[2]} | "
                         f"{ours:.0f} / {bare:.0f} µs = {ratio:.2f}× | {'PASS' if ratio <= target else 'FAIL'} |")
    for key, runs in cells.items():
        lat, k, conc = key
        if conc == 512 and lat == 0.05:
            ceiling = conc / lat
            parts = []
            for c in ("ours", "bare", "aiohttp"):
                if c in runs:
                    parts.append(f"{c} {median_of(runs[c], 'rps'):,.0f} = {median_of(runs[c], 'rps') / ceiling:.0%}")
            ours = median_of(runs["ours"], "rps") / ceiling if "ours" in runs else float("nan")
            lines.append(f"| ≥ 95% of ceiling {ceiling:,.0f} req/s | 50 ms, {k}, 512 | {'; '.join(parts)} | "
                         f"{'PASS' if ours >= 0.95 else 'FAIL'} |")
    if {"ours", "atropos"} <= have:
        for key, runs in cells.items():
            lat, k, conc = key
            if conc == 512 and lat == 0:
                ratio = median_of(runs["ours"], "rps") / median_of(runs["atropos"], "rps")
                lines.append(f"| ≥ 15× Atropos throughput | 0 ms, {k}, 512 | "
                             f"{median_of(runs['ours'], 'rps'):,.0f} / {median_of(runs['atropos'], 'rps'):,.0f} = "
                             f"{ratio:.1f}× | {'PASS' if ratio >= 15 else 'FAIL'} |")
    lines.append("")
    return lines


def machine_meta(argv):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = []
    try:
        import importlib.metadata as md
        for p in ("atroposlib", "openai", "httpx", "aiohttp"):
            try:
                versions.append(f"{p} {md.version(p)}")
            except md.PackageNotFoundError:
                pass
    except ImportError:
        pass
    exe = sys.executable
    cmd = " ".join([shlex.quote(exe), "bench/bench_dispatch.py"] + [shlex.quote(a) for a in argv])
    return {"date": datetime.date.today().isoformat(), "nproc": os.cpu_count(), "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version(),
            "versions": ", ".join(versions) or "none", "command": cmd}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 cells, few requests")
    p.add_argument("--clients", default=",".join(ALL_CLIENTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=5000, help="measured requests per run (5000)")
    p.add_argument("--slow-requests", type=int, default=1500, help="... for atropos and openai (1500)")
    p.add_argument("--min-rounds", type=int, default=40, metavar="R",
                   help="but at least R x concurrency requests for the other clients (40): all C requests of "
                        "the first round leave at once, which costs a short run several %% of its throughput")
    p.add_argument("--concurrency", default="64,512")
    p.add_argument("--latency", default="0,0.05", help="server latencies in seconds")
    p.add_argument("--servers", default="2,8")
    p.add_argument("--server", choices=("stub", "fast"), default="stub")
    p.add_argument("--write", metavar="FILE", help="also write the markdown report to FILE")
    p.add_argument("--profile", action="store_true", help="cProfile 'ours' at 0 ms, 2 servers, concurrency 64")
    p.add_argument("--json", metavar="FILE", help="also dump every run as JSON")
    p.add_argument("--quiet-wait", type=float, default=5.0, metavar="S",
                   help="before each run wait up to S s for other processes to go under 0.3 cores (5; 0 = off)")
    p.add_argument("--redo", type=int, default=2, metavar="N",
                   help="repeat a run up to N times while other processes used over 0.3 cores in it (2)")
    # internal
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fast-server", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.fast_server:
        fast_server_main([int(x) for x in args.fast_server.split(",")], float(args.latency))
        return 0
    if args.worker:
        args.concurrency = int(args.concurrency)
        if args.worker == "profile":
            profile_main(args)
            return 0
        print(json.dumps(asyncio.run(worker_main(args))))
        return 0

    if args.profile:
        server = ServerProcess(args.server, 2, 0.0)
        try:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "profile", "--urls", ",".join(server.urls),
                   "--concurrency", "64", "--requests", str(args.requests)]
            subprocess.run(cmd, cwd=ROOT, check=True)
        finally:
            server.stop()
        return 0

    if args.quick:
        args.repeats, args.requests, args.slow_requests, args.min_rounds = 1, 1500, 600, 4
        args.concurrency, args.latency, args.servers = "512", "0,0.05", "8"
    clients, missing = available_clients([c.strip() for c in args.clients.split(",") if c.strip()])
    for c, why in missing.items():
        print(f"bench: skipping {c}: {why}", file=sys.stderr)
    grid = [(float(lat), int(k), int(c)) for lat in args.latency.split(",")
            for k in args.servers.split(",") for c in args.concurrency.split(",")]
    cells = {}
    started = time.monotonic()
    for lat, k, conc in grid:
        server = ServerProcess(args.server, k, lat)
        runs = cells[(lat, k, conc)] = {c: [] for c in clients}
        try:
            for rep in range(args.repeats):
                order = clients[rep % len(clients):] + clients[:rep % len(clients)]
                for c in order:
                    n = args.slow_requests if c in SLOW_CLIENTS else max(args.requests, args.min_rounds * conc)
                    n = -(-n // conc) * conc  # whole rounds: a last, partly filled round would count as idle
                    r = None
                    for attempt in range(1 + args.redo):  # a run that others disturbed is done again
                        if args.quiet_wait:
                            wait_quiet(args.quiet_wait)
                        new = run_worker(c, server, conc, n)
                        if r is None or "error" in r or ("error" not in new and new["other_busy"] < r["other_busy"]):
                            r = new
                        if "error" in r or r["other_busy"] <= OTHER_LOAD_LIMIT:
                            break
                        print(f"  ... disturbed: other processes used {new['other_busy']:.2f} cores; again",
                              file=sys.stderr)
                    runs[c].append(r)
                    if "error" in r:
                        print(f"  {lat*1000:.0f} ms, {k} servers, c={conc}, {c}: ERROR {r['error']}", file=sys.stderr)
                    else:
                        print(f"  {lat*1000:.0f} ms, {k} servers, c={conc}, {c:8} rep {rep + 1}: "
                              f"{r['rps']:8,.0f} req/s {r['cpu_us']:7.0f} µs/req ({r['sys_us']:.0f} sys)  p50 {r['p50_ms']:6.1f} "
                              f"p99 {r['p99_ms']:6.1f} ms  client {r['client_busy']:.2f} server {r['server_busy']:.2f} other {r['other_busy']:.2f}"
                              f"  [{time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
        finally:
            server.stop()
    report = build_report(cells, clients, missing, args, machine_meta(argv))
    print(report)
    if args.write:
        notes = ""
        try:
            with open(args.write) as f:
                old = f.read()
            if NOTES_MARKER in old:
                notes = "\n" + old[old.index(NOTES_MARKER):]
        except OSError:
            pass
        with open(args.write, "w") as f:
            f.write(report + notes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"latency": k[0], "servers": k[1], "concurrency": k[2], "runs": v} for k, v in cells.items()],
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
