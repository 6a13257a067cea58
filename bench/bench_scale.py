"""Scale benchmark: ServerManager over 8, 512 and 4,096 servers on loopback.

Large RL jobs run 64-512 inference nodes, 8 servers each: 512 to 4,096 servers.  This
measures what grows with the server count:

* **client CPU per request** at K = 8, 512, 4,096 servers, in two loads: *free* (512 in
  flight, the default cap of 512 per server: a slot is always free) and *saturated* (8,192
  requests in flight for 4,096 slots in total at every K, cap = 4,096 / K per server: every
  request waits for a slot and every release hands one on); target: 4,096 within 1.2x of 8;
* **construction**: ``configs_for_urls`` + ``ServerManager(...)`` for 4,096 URLs, and
  **discovery** of a 512-node nodelist (``discover_servers``, Python expander and scontrol
  when present); target: under 100 ms each;
* **memory per idle server**: RSS and Python heap (tracemalloc) per server, constructed,
  then with one idle keep-alive connection each;
* **probe load with half of 4,096 servers down** (every other node of 8 down: nothing
  listens on their ports): health probes per second, the busiest 100 ms against the mean
  (a synchronised herd shows as a high peak), and, once the servers come back, how long the
  2,048 recoveries take from first to last (all at once = a thundering herd);
* **mass cancellation**: 10,000 and 40,000 callers waiting for a slot (every server at its
  cap) cancelled at once, in random order (a trainer step aborted): the event loop time until
  every one is gone, and that the slots still work after.

One server process holds every server: the canned-answer ``asyncio.Protocol`` server of
``bench_dispatch.py`` (``--server fast``) listening on K ports of 127.0.0.1, in a block outside
the ephemeral range (32768-60999) so that client connections never collide with it.  Each
measurement runs in a fresh client process.  RLIMIT_NOFILE is raised to its hard limit.

Two measurements reach inside on purpose, and say where: the probe storm marks half the
servers down at one instant (``manager._start_probe``, as a failed request would), and the
memory measure counts idle connections (``server._pool``).

    python3 bench/bench_scale.py                    # everything, ~3 min
    python3 bench/bench_scale.py --only cpu --repeats 5
    python3 bench/bench_scale.py --only probes
    python3 bench/bench_scale.py --only cancel
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import atropos_slurm as a  # noqa: E402
import bench_dispatch as bd  # noqa: E402

SIZES = (8, 512, 4096)
TOTAL_SLOTS = 4096  # saturated load: slots over all servers, at every size
PORT_BASES = (20000, 12000, 61000, 4096)  # blocks outside the ephemeral range 32768-60999
PER_NODE = 8


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def port_block(count: int) -> int:
    """A base port with ``count`` free consecutive ports, outside the ephemeral range."""
    low, high = a.ephemeral_port_range()
    for base in PORT_BASES:
        if base + count > 65536 or not (base + count <= low or base > high):
            continue
        try:
            if a.free_port_block(count, preferred=base) == base:
                return base
        except a.ConfigError:
            pass
    raise SystemExit(f"bench_scale: no {count} free consecutive ports outside {low}-{high}")


class Servers:
    """The fast canned-answer server of bench_dispatch.py on ``ports``, in its own process."""

    def __init__(self, ports, latency: float = 0.0):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "bench_dispatch.py"), "--fast-server", ",".join(map(str, ports)),
             "--latency", str(latency)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            preexec_fn=raise_nofile)
        line = self.proc.stderr.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def urls_for(base: int, count: int):
    return [f"http://127.0.0.1:{base + i}/v1" for i in range(count)]


def make_manager(urls, cap: int, **kwargs):
    template = a.ServerBaseline(timeout=60, model_name=bd.MODEL, num_max_requests_at_once=cap)
    return a.ServerManager(a.configs_for_urls(template, urls), **kwargs)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# =============================================================================================
# Workers (each in a fresh process; print one JSON line)
# =============================================================================================


async def worker_cpu(urls, concurrency: int, cap: int, requests: int) -> dict:
    manager = make_manager(urls, cap)

    async def one(i):
        resp = await manager.chat_completion(messages=bd.MESSAGES, max_tokens=bd.MAX_TOKENS)
        return resp.choices[0].message.content
    try:
        # warm-up: every server gets its connections (round-robin), caches fill
        await bd.run_load(one, concurrency, max(2 * concurrency, 2 * len(urls), 256))
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await bd.run_load(one, concurrency, requests)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await manager.close()
    return {"cpu_us": cpu / requests * 1e6, "rps": requests / wall, "client_busy": cpu / wall}


def worker_build(count: int, repeats: int) -> dict:
    """Median ms: configs_for_urls + ServerManager for ``count`` URLs; discovery of count/8 + 1 nodes."""
    urls = urls_for(9000, count)
    template = a.ServerBaseline(timeout=60, model_name=bd.MODEL)
    configs_ms, manager_ms, discover_ms, scontrol_ms, slurm_ms = [], [], [], [], []
    nodes = count // PER_NODE
    nodelist = f"gpu-a[0001-{nodes // 2:04d}],gpu-b[0001-{nodes - nodes // 2 + 1:04d}]"  # 1 training node
    env = {"SLURM_JOB_NODELIST": nodelist, "NUM_TRAINING_NODES": "1", "ATROPOS_SLURM_HOSTLIST": "python"}
    have_scontrol = shutil.which("scontrol")
    if have_scontrol and not os.environ.get("SLURM_CONF") and not os.path.exists("/etc/slurm/slurm.conf"):
        # ``scontrol show hostnames`` needs a configuration source, not a controller: two lines do.
        conf = os.path.join(tempfile.mkdtemp(prefix="bench-scale-"), "slurm.conf")
        with open(conf, "w") as f:
            f.write("ClusterName=bench\nSlurmctldHost=localhost\n")
        os.environ["SLURM_CONF"] = conf
    for _ in range(repeats):
        # Each step starts from a collected heap, with nothing of the previous step alive: as a
        # trainer makes its manager once, at start-up.
        gc.collect()
        t0 = time.perf_counter()
        configs = a.configs_for_urls(template, urls)
        t1 = time.perf_counter()
        a.ServerManager(configs)
        t2 = time.perf_counter()
        configs_ms.append((t1 - t0) * 1e3)
        manager_ms.append((t2 - t1) * 1e3)
        del configs
        gc.collect()
        t0 = time.perf_counter()
        d = a.discover_servers(env=env)
        discover_ms.append((time.perf_counter() - t0) * 1e3)
        if have_scontrol:
            gc.collect()
            t0 = time.perf_counter()
            a.discover_servers(env=dict(env, ATROPOS_SLURM_HOSTLIST="scontrol"))
            scontrol_ms.append((time.perf_counter() - t0) * 1e3)
        old = dict(os.environ)
        os.environ.update(env)
        try:
            gc.collect()
            t0 = time.perf_counter()
            a.ServerManager(template, slurm=True)
            slurm_ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            os.environ.clear()
            os.environ.update(old)
    assert len(d.servers) == count, (len(d.servers), count)
    med = statistics.median
    return {"servers": count, "nodes": nodes + 1, "nodelist": nodelist, "configs_ms": med(configs_ms),
            "manager_ms": med(manager_ms), "discover_ms": med(discover_ms),
            "scontrol_ms": med(scontrol_ms) if scontrol_ms else None, "slurm_manager_ms": med(slurm_ms)}


async def worker_memory(urls) -> dict:
    import tracemalloc
    count = len(urls)
    gc.collect()
    tracemalloc.start()
    rss0, heap0 = rss_bytes(), tracemalloc.get_traced_memory()[0]
    manager = make_manager(urls, 512)
    gc.collect()
    rss1, heap1 = rss_bytes(), tracemalloc.get_traced_memory()[0]
    await asyncio.gather(*(manager.chat_completion(messages=bd.MESSAGES, max_tokens=bd.MAX_TOKENS)
                           for _ in range(count)))  # round-robin: one request, then one idle connection, each
    gc.collect()
    rss2, heap2 = rss_bytes(), tracemalloc.get_traced_memory()[0]
    idle = sum(s._pool.idle_count for s in manager.servers)
    await manager.close()
    return {"servers": count, "idle_connections": idle,
            "rss_constructed": (rss1 - rss0) / count, "heap_constructed": (heap1 - heap0) / count,
            "rss_idle_conn": (rss2 - rss0) / count, "heap_idle_conn": (heap2 - heap0) / count}


def steady_waits(interval: float, rng=None):
    """The probe waits before jitter (0.1 s doubling up to the interval), for the comparison row."""
    step = min(0.1, interval)
    while True:
        yield step
        step = min(step * 2, interval)


async def worker_probes(urls, down, interval: float, recover_after: float, ports_down, jitter: bool) -> dict:
    """Half the servers marked down at one instant (a switch blip): count the health probes
    (client side) until they come back, and when each comes back."""
    if not jitter:
        a.probe_waits = steady_waits
    manager = make_manager(urls, 512, health_probe_interval=interval, retry_backoff=0.01, retry_backoff_max=0.05)
    loop = asyncio.get_running_loop()
    probes, recovered = [], {}
    down_urls = {urls[i] for i in down}
    original = a.OpenAIServer.check_health

    async def counted(self):
        probes.append(loop.time())
        ok = await original(self)
        if ok and self.url in down_urls and self.url not in recovered:
            recovered[self.url] = loop.time()
        return ok
    a.OpenAIServer.check_health = counted
    stop = asyncio.Event()

    async def load():  # 64 requests in flight throughout, as a trainer would keep them
        async def worker():
            while not stop.is_set():
                try:
                    await manager.chat_completion(messages=bd.MESSAGES, max_tokens=bd.MAX_TOKENS)
                except a.ServerError:
                    pass
        await asyncio.gather(*(worker() for _ in range(64)))
    cpu0 = time.process_time()
    load_task = asyncio.ensure_future(load())
    await asyncio.sleep(1.0)
    marked = loop.time()
    for i in down:  # the blip: every request to these failed at once
        manager.slots.set_healthy(manager.slots.records[i], False, "benchmark: connection reset")
        manager._start_probe(manager.slots.records[i])
    await asyncio.sleep(recover_after)
    server_b = Servers(ports_down)  # the down half comes back
    back = loop.time()
    while len(recovered) < len(down) and loop.time() - back < 3 * interval + 5:
        await asyncio.sleep(0.05)
    done = loop.time()
    stop.set()
    await load_task
    cpu = time.process_time() - cpu0
    await manager.close()
    server_b.stop()
    a.OpenAIServer.check_health = original

    start = marked + 2 * interval  # past the first backoff steps
    steady = [t for t in probes if start <= t < back]
    buckets = [0] * max(1, int((back - start) / 0.1))
    for t in steady:
        buckets[min(len(buckets) - 1, int((t - start) / 0.1))] += 1
    rate = len(steady) / (back - start)
    times = sorted(recovered.values())
    return {"servers": len(urls), "down": len(down), "interval": interval, "jitter": jitter,
            "probes_per_s": rate, "peak_per_100ms": max(buckets), "mean_per_100ms": rate / 10,
            "recovered": len(recovered),
            "recovery_first_s": times[0] - back if times else None,
            "recovery_spread_s": times[-1] - times[0] if times else None,
            "recovery_last_s": times[-1] - back if times else None,
            "recovered_first_500ms": sum(t - times[0] < 0.5 for t in times) if times else 0,
            "client_cpu_s": cpu, "wall_s": done - marked + 1.0}


# =============================================================================================
# Orchestrator
# =============================================================================================


async def worker_cancel(urls, waiting: int, cap: int) -> dict:
    """Fill every slot with requests the server answers only after 30 s, queue ``waiting`` more
    callers, cancel those in random order at once; then free the slots and check one more call."""
    import random
    manager = make_manager(urls, cap)
    loop = asyncio.get_running_loop()

    def call():
        return asyncio.ensure_future(manager.chat_completion(messages=bd.MESSAGES, max_tokens=bd.MAX_TOKENS))
    try:
        holders = [call() for _ in range(cap * len(urls))]
        while manager.slots.in_flight_totals["train"] < len(holders):
            await asyncio.sleep(0.01)
        waiters = [call() for _ in range(waiting)]
        while manager.slots.waiting("train") < waiting:
            await asyncio.sleep(0.01)
        order = list(waiters)
        random.Random(1).shuffle(order)
        cpu0, wall0 = time.process_time(), loop.time()
        for task in order:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0, loop.time() - wall0
        left = manager.slots.waiting("train")
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        free = manager.slots.in_flight_totals["train"]
    finally:
        await manager.close()
    return {"waiting": waiting, "cpu_ms": cpu * 1e3, "wall_ms": wall * 1e3, "left_waiting": left,
            "in_flight_after": free}


def run_worker(kind: str, payload: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]  # the payload on stdin: 4,096 URLs are long
    done = subprocess.run(cmd, cwd=ROOT, input=json.dumps(payload), capture_output=True, text=True, timeout=900,
                          preexec_fn=raise_nofile)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_cpu(args, base) -> dict:
    """{(load, K): [runs]}: the sizes alternate within each repeat."""
    results = {}
    for load, concurrency in (("free", 512), ("saturated", 2 * TOTAL_SLOTS)):
        for rep in range(args.repeats):
            order = SIZES if rep % 2 == 0 else tuple(reversed(SIZES))
            for k in order:
                cap = 512 if load == "free" else TOTAL_SLOTS // k
                servers = Servers(range(base, base + k))
                try:
                    bd.wait_quiet(args.quiet_wait)
                    r = run_worker("cpu", {"urls": urls_for(base, k), "concurrency": concurrency, "cap": cap,
                                           "requests": args.requests})
                finally:
                    servers.stop()
                r.update(load=load, k=k, cap=cap, concurrency=concurrency)
                results.setdefault((load, k), []).append(r)
                print(f"  cpu {load:9} K={k:5} cap={cap:4} C={concurrency}: {r['cpu_us']:6.1f} µs/req "
                      f"{r['rps']:8,.0f} req/s", file=sys.stderr, flush=True)
    return results


def report(cpu, build, memory, probes, cancel, meta) -> str:
    med = statistics.median
    out = ["# Scale benchmark: ServerManager over 8, 512 and 4,096 servers\n", meta, ""]
    if cpu:
        out += ["## Client CPU per request\n",
                "Median of the repeats (each in a fresh client process; µs of client CPU per request, "
                "and requests/s). *free*: 512 in flight, cap 512 per server. *saturated*: 8,192 in flight, "
                "4,096 slots in all (cap 4,096/K per server): every request waits for a slot.\n",
                "| load | 8 servers | 512 servers | 4,096 servers | 4,096 vs 8 (target ≤ 1.2×) |", "|---|---|---|---|---|"]
        for load in ("free", "saturated"):
            cells, us = [], {}
            for k in SIZES:
                runs = cpu.get((load, k), [])
                if not runs:
                    cells.append("-")
                    continue
                us[k] = med(r["cpu_us"] for r in runs)
                cells.append(f"{us[k]:.1f} µs · {med(r['rps'] for r in runs):,.0f} req/s "
                             "(" + ", ".join(f"{r['cpu_us']:.0f}" for r in runs) + ")")
            ratio = us[4096] / us[8] if 8 in us and 4096 in us else float("nan")
            out.append(f"| {load} | " + " | ".join(cells) + f" | {ratio:.2f}× {'PASS' if ratio <= 1.2 else 'FAIL'} |")
        out.append("")
    if build:
        out += ["## Construction and discovery (median ms; target < 100 ms)\n",
                "| servers (nodes) | configs_for_urls | ServerManager(configs) | discover_servers (Python hostlist) "
                "| discover_servers (scontrol) | ServerManager(slurm=True) |", "|---|---|---|---|---|---|"]
        for b in build:
            sc = f"{b['scontrol_ms']:.1f}" if b["scontrol_ms"] is not None else "scontrol not installed"
            out.append(f"| {b['servers']:,} ({b['nodes']} nodes: `{b['nodelist']}`) | {b['configs_ms']:.1f} | "
                       f"{b['manager_ms']:.1f} | {b['discover_ms']:.1f} | {sc} | {b['slurm_manager_ms']:.1f} |")
        out.append("")
    if memory:
        out += ["## Memory per idle server\n",
                "| servers | RSS / server, constructed | Python heap / server, constructed | RSS / server, "
                "+ 1 idle connection | Python heap / server, + 1 idle connection |", "|---|---|---|---|---|"]
        for m in memory:
            out.append(f"| {m['servers']:,} | {m['rss_constructed'] / 1024:.1f} KiB | {m['heap_constructed'] / 1024:.1f} KiB"
                       f" | {m['rss_idle_conn'] / 1024:.1f} KiB | {m['heap_idle_conn'] / 1024:.1f} KiB |")
        out.append("")
    if cancel:
        out += ["## Mass cancellation\n",
                "Every slot held (8 servers, cap 64, answers after 30 s); then *waiting* callers queue for a slot "
                "and are all cancelled at once, in random order.\n",
                "| waiting callers | event loop time until all gone | client CPU | still waiting after | "
                "slots in use after the holders are cancelled too |", "|---|---|---|---|---|"]
        for c in cancel:
            out.append(f"| {c['waiting']:,} | {c['wall_ms']:.1f} ms | {c['cpu_ms']:.1f} ms | {c['left_waiting']} | "
                       f"{c['in_flight_after']} |")
        out.append("")
    if probes:
        p = probes[0]
        out += ["## Health probes with half of 4,096 servers down\n",
                f"{p['down']:,} of {p['servers']:,} servers (every other node of 8; nothing listens on their ports) "
                f"marked down at one instant, as a switch blip would, with 64 requests in flight throughout; "
                f"`health_probe_interval={p['interval']:g}`. Probes counted in the client from two intervals after "
                f"the blip; after three intervals a server process starts on the down ports. "
                f"*without jitter*: the waits of the code before this change (0.1 s doubling to the interval), "
                f"*with jitter*: `probe_waits` (each wait × [0.5, 1.5]).\n",
                "| probe waits | probes/s (steady) | down / interval | busiest 100 ms | mean per 100 ms | peak / mean "
                "| recovered | back in the first 500 ms | first / last back after restart | client CPU |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for p in probes:
            out.append(f"| {'with jitter' if p['jitter'] else 'without jitter'} | {p['probes_per_s']:,.0f} | "
                       f"{p['down'] / p['interval']:,.0f} | {p['peak_per_100ms']:,} | {p['mean_per_100ms']:,.1f} | "
                       f"{p['peak_per_100ms'] / p['mean_per_100ms']:.1f}× | {p['recovered']:,} / {p['down']:,} | "
                       f"{p['recovered_first_500ms']:,} | {p['recovery_first_s']:.2f} s / {p['recovery_last_s']:.2f} s | "
                       f"{p['client_cpu_s']:.1f} s in {p['wall_s']:.0f} s |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("cpu", "build", "memory", "probes", "cancel"), action="append",
                   help="run only these parts (repeatable); default: all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=40960, help="measured requests per CPU run (40960)")
    p.add_argument("--probe-interval", type=float, default=5.0)
    p.add_argument("--quiet-wait", type=float, default=5.0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raise_nofile()

    if args.worker:
        w = json.load(sys.stdin)
        if args.worker == "cpu":
            r = asyncio.run(worker_cpu(w["urls"], w["concurrency"], w["cap"], w["requests"]))
        elif args.worker == "build":
            r = worker_build(w["count"], w["repeats"])
        elif args.worker == "memory":
            r = asyncio.run(worker_memory(w["urls"]))
        elif args.worker == "cancel":
            r = asyncio.run(worker_cancel(w["urls"], w["waiting"], w["cap"]))
        else:
            r = asyncio.run(worker_probes(w["urls"], w["down"], w["interval"], w["recover_after"], w["ports_down"],
                                          w["jitter"]))
        print(json.dumps(r))
        return 0

    parts = set(args.only or ("cpu", "build", "memory", "probes", "cancel"))
    base = port_block(max(SIZES))
    busy0, wall0 = bd._machine_busy(), time.perf_counter()
    cpu = measure_cpu(args, base) if "cpu" in parts else {}
    build = [run_worker("build", {"count": k, "repeats": 5}) for k in (512, 4096)] if "build" in parts else []
    memory = []
    if "memory" in parts:
        for k in (512, 4096):
            servers = Servers(range(base, base + k))
            try:
                memory.append(run_worker("memory", {"urls": urls_for(base, k)}))
            finally:
                servers.stop()
    probes = []
    if "probes" in parts:
        k = max(SIZES)
        down = [i for i in range(k) if (i // PER_NODE) % 2 == 1]
        up = [base + i for i in range(k) if (i // PER_NODE) % 2 == 0]
        for jitter in (False, True):
            servers = Servers(up)
            try:
                probes.append(run_worker("probes", {"urls": urls_for(base, k), "down": down,
                                                    "interval": args.probe_interval,
                                                    "recover_after": 3 * args.probe_interval,
                                                    "ports_down": [base + i for i in down], "jitter": jitter}))
            finally:
                servers.stop()
    cancel = []
    if "cancel" in parts:
        servers = Servers(range(base, base + 8), latency=30.0)
        try:
            cancel = [run_worker("cancel", {"urls": urls_for(base, 8), "waiting": w, "cap": 64}) for w in (10000, 40000)]
        finally:
            servers.stop()
    load = (bd._machine_busy() - busy0) / (time.perf_counter() - wall0)
    meta = (f"- {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            f"`python3 bench/bench_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
            f"servers: bench_dispatch.py's fast canned-answer server, one process, ports {base}+; "
            f"whole machine busy {load:.2f} cores on average during the run (client + server + others)")
    print(report(cpu, build, memory, probes, cancel, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
