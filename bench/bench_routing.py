"""Routing on real vLLM servers: how much of each prompt the servers' prefix caches serve.

Arms (every one against the same vLLM CPU servers, caches emptied before each with
``POST /reset_prefix_cache``, which needs the servers started with ``VLLM_SERVER_DEV_MODE=1``):

  one_server      every request on one server: the bound (every prefix can hit)
  round_robin     ``ServerManager(routing="round_robin")`` (the dispatch before routing)
  prefix          ``ServerManager(routing="prefix")``: prefix affinity, no header from the caller
  prefix_load     prefix affinity + the servers' own queues (``server_load_interval``)
  router_rr       ``vllm-router --policy round_robin`` in front of the servers
  router_cache    ``vllm-router --policy cache_aware`` (its default)
  router_sticky   ``vllm-router --policy sticky_least_loaded`` given ``X-Session-ID`` per episode/group

Workloads (RL-shaped; sizes in the tiny model's tokens):

  W1  multi-turn episodes, all at once: a shared ~500-token system prompt, a ~100-token task,
      then turns of ~30-token observations and 32-token answers (the history grows)
  W2  GRPO groups of n=16, split into 4 parts of n=4 (``max_n_completions=4``): a ~300-token
      shared header + a ~300-token question
  W3  unrelated ~300-token prompts (nothing to share)

Metrics: hit rate = summed ``vllm:prefix_cache_hits_total`` / ``..._queries_total`` deltas over
the servers; requests per server from ``vllm:request_success_total`` deltas (spread =
max/min); wall time; p50/p99 latency per call; client CPU per request (process time, ours only;
the router arms use aiohttp, their CPU is not comparable).

    /opt/atropos-vllm-venv/bin/python bench/bench_routing.py serve --count 3   # ports 19300..
    /opt/atropos-vllm-venv/bin/python bench/bench_routing.py run --out /tmp/routing.json
    /opt/atropos-vllm-venv/bin/python bench/bench_routing.py stop

Run with the vLLM venv's Python (aiohttp for the router arms, the tokenizer for ``--trace``).
vLLM CPU 0.32 crashes its engine on a per-request ``seed``: none is sent.
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atropos_slurm as a  # noqa: E402

RUN_DIR = "/tmp/atropos-routing-run"
VLLM_PY = "/opt/atropos-vllm-venv/bin/python"
ROUTER_BIN = "/opt/atropos-router-venv/bin/vllm-router"
MODEL_DIR = "/tmp/atropos-vllm-model"
BASE_PORT, ROUTER_PORT = 19300, 19320
ARMS = ("one_server", "round_robin", "prefix", "prefix_load", "router_rr", "router_cache", "router_sticky")
WORKLOADS = ("W1", "W2", "W3")
ANSWER_TOKENS = 32

# -- servers -----------------------------------------------------------------------------------


def serve(count: int, base_port: int) -> None:
    """Start ``count`` vLLM CPU servers (own process groups, PID files in RUN_DIR), wait for them."""
    os.makedirs(RUN_DIR, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1")
    for i in range(count):
        port = base_port + i
        with open(f"{RUN_DIR}/s{i}.log", "w") as log:
            proc = subprocess.Popen(
                [VLLM_PY, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL_DIR, "--served-model-name",
                 "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
                 "--seed", "0", "--enforce-eager"],
                env=dict(env, VLLM_CPU_OMP_THREADS_BIND=str(i % max(1, os.cpu_count() or 1))),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        with open(f"{RUN_DIR}/s{i}.pid", "w") as f:
            f.write(str(proc.pid))
    urls = [f"http://127.0.0.1:{base_port + i}/v1" for i in range(count)]
    down = asyncio.run(a.wait_for_servers(urls, min_healthy=count, timeout=300, interval=1, health_path="/health",
                                          probe_timeout=5))
    if down:
        sys.exit(f"servers not healthy: {down}")


def stop() -> None:
    """Stop the servers (and a router) this script started, by their saved PIDs."""
    for name in sorted(os.listdir(RUN_DIR)) if os.path.isdir(RUN_DIR) else []:
        if name.endswith(".pid"):
            pid = int(open(os.path.join(RUN_DIR, name)).read())
            try:
                os.killpg(pid, signal.SIGTERM)
                print(f"stopped {name[:-4]} (pid {pid})")
            except ProcessLookupError:
                pass
            os.remove(os.path.join(RUN_DIR, name))


def start_router(policy: str, urls, port: int) -> subprocess.Popen:
    workers = [u[:-3] for u in urls]  # without /v1
    log = open(f"{RUN_DIR}/router-{policy}.log", "w")
    proc = subprocess.Popen([ROUTER_BIN, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                             "--worker-urls", *workers, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    with open(f"{RUN_DIR}/router.pid", "w") as f:
        f.write(str(proc.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"vllm-router ({policy}) did not come up; see {RUN_DIR}/router-{policy}.log")


def stop_router(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    os.remove(f"{RUN_DIR}/router.pid")


# -- server counters ----------------------------------------------------------------------------

METRIC = re.compile(r'^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$')


def counters(url: str):
    """This server's prefix-cache queries and hits and finished requests (summed over labels)."""
    with urllib.request.urlopen(url[:-3] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"queries": 0.0, "hits": 0.0, "requests": 0.0}
    names = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits",
             "vllm:request_success_total": "requests"}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m and m.group(1) in names:
            out[names[m.group(1)]] += float(m.group(3))
    return out


def reset_caches(urls) -> None:
    for url in urls:
        req = urllib.request.Request(url[:-3] + "/reset_prefix_cache", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200:
                raise SystemExit(f"{url}: reset_prefix_cache answered {r.status} (VLLM_SERVER_DEV_MODE=1?)")


# -- workloads ------------------------------------------------------------------------------------

WORDS = ("alpha beta gamma delta river stone cloud seven orange market signal garden copper window "
         "planet silver ladder forest bridge candle").split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def workload(name: str, scale: float, rng: random.Random):
    """A list of "sessions": each a list of steps run one after another; sessions run at once.

    A step is ("chat", messages-so-far builder) for W1, or a one-shot body for W2/W3."""
    if name == "W1":
        system = "You are an agent in a text world. " + text(rng, 105)  # ~4.5 tokens a word
        episodes = max(2, int(24 * scale))
        return [{"kind": "episode", "system": system, "task": text(rng, 22), "turns": 6,
                 "observations": [text(rng, 7) for _ in range(6)]} for _ in range(episodes)]
    if name == "W2":
        header = "Solve the problem. Show your reasoning. " + text(rng, 62)
        return [{"kind": "group", "messages": [{"role": "system", "content": header},
                                               {"role": "user", "content": text(rng, 66)}]}
                for _ in range(max(2, int(40 * scale)))]
    return [{"kind": "single", "messages": [{"role": "user", "content": text(rng, 66) + " " + str(i)}]}
            for i in range(max(3, int(200 * scale)))]


# -- clients -------------------------------------------------------------------------------------

BODY = {"max_tokens": ANSWER_TOKENS, "temperature": 1.0, "ignore_eos": True}


class ManagerClient:
    """Our ServerManager, in one arm's configuration."""

    def __init__(self, urls, routing, load_interval=0.0):
        template = a.APIServerConfig(base_url=urls[0], model_name="tiny", timeout=600,
                                     num_max_requests_at_once=256, num_requests_for_eval=64)
        configs = a.configs_for_urls(template, urls)
        kwargs = {"server_load_interval": load_interval} if load_interval else {}
        self.manager = a.ServerManager(configs, max_n_completions=4, routing=routing, **kwargs)

    async def chat(self, session, body):
        return await self.manager.chat_completion(**body)

    async def close(self):
        await self.manager.close()


class RouterClient:
    """aiohttp to a vllm-router; ``sticky`` sends X-Session-ID per session; n split as ours does."""

    def __init__(self, url, sticky):
        import aiohttp
        self.url, self.sticky = url + "/chat/completions", sticky
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def chat(self, session, body):
        n = body.get("n", 1)
        parts = [dict(body, n=4)] * (n // 4) if n > 4 else [body]
        headers = {"X-Session-ID": str(session)} if self.sticky else {}

        async def one(part):
            async with self.http.post(self.url, json=dict(part, model="tiny"), headers=headers) as r:
                data = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"router answered {r.status}: {data}")
                return data

        answers = await asyncio.gather(*(one(p) for p in parts))
        return {"choices": [c for ans in answers for c in ans["choices"]]}

    async def close(self):
        await self.http.close()


def content(choice):
    message = choice["message"]
    return message["content"] if isinstance(message, dict) else message.content


async def run_sessions(client, sessions, latencies):
    async def timed(session, body):
        started = time.monotonic()
        resp = await client.chat(session, body)
        latencies.append(time.monotonic() - started)
        return resp

    async def one(i, s):
        if s["kind"] == "episode":
            messages = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["task"]}]
            for t in range(s["turns"]):
                resp = await timed(i, dict(BODY, messages=messages))
                messages = messages + [{"role": "assistant", "content": content(resp["choices"][0])},
                                       {"role": "user", "content": s["observations"][t]}]
        elif s["kind"] == "group":
            await timed(i, dict(BODY, messages=s["messages"], n=16))
        else:
            await timed(i, dict(BODY, messages=s["messages"]))

    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))


class Tracer:
    """Records, for the simulator's check (``sim_routing.py --replay``), each request's server,
    prompt and output token ids (vLLM's ``return_token_ids``), start and end times."""

    def __init__(self):
        self.events, self._post = [], a.OpenAIServer.post

    def __enter__(self):
        tracer, post = self, self._post

        async def traced(server, path, body, *args, **kwargs):
            started = time.monotonic()
            resp = await post(server, path, dict(body, return_token_ids=True), *args, **kwargs)
            ended = time.monotonic()
            tracer.events.append({"url": server.url, "n": body.get("n", 1), "start": started, "end": ended,
                                  "prompt": resp["prompt_token_ids"],
                                  "outputs": [c["token_ids"] for c in resp["choices"]]})
            return resp

        a.OpenAIServer.post = traced
        return self

    def __exit__(self, *exc):
        a.OpenAIServer.post = self._post

    def replay_events(self):
        """Start (the prompt looked up) and end (the outputs cached) events, in time order."""
        out = []
        for e in self.events:
            out.append((e["start"], {"kind": "start", "url": e["url"], "prompt": e["prompt"], "n": e["n"]}))
            out.append((e["end"], {"kind": "end", "url": e["url"], "prompt": e["prompt"], "outputs": e["outputs"]}))
        return [event for _, event in sorted(out, key=lambda pair: pair[0])]


def run_arm(arm, name, urls, sessions, tracer=None):
    targets = urls[:1] if arm == "one_server" else urls
    reset_caches(urls)
    before = [counters(u) for u in urls]
    router = None
    if arm.startswith("router_"):
        policy = {"router_rr": "round_robin", "router_cache": "cache_aware",
                  "router_sticky": "sticky_least_loaded"}[arm]
        router = start_router(policy, urls, ROUTER_PORT)
    latencies = []

    async def main():
        if router is not None:
            client = RouterClient(f"http://127.0.0.1:{ROUTER_PORT}/v1", arm == "router_sticky")
        else:
            client = ManagerClient(targets, "prefix" if arm.startswith("prefix") else "round_robin",
                                   0.5 if arm == "prefix_load" else 0.0)
        try:
            await run_sessions(client, sessions, latencies)
        finally:
            await client.close()

    cpu, wall = time.process_time(), time.monotonic()
    try:
        if tracer is not None:
            with tracer:
                asyncio.run(main())
        else:
            asyncio.run(main())
    finally:
        if router is not None:
            stop_router(router)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    time.sleep(0.5)  # the servers' metrics are published shortly after the request ends
    after = [counters(u) for u in urls]
    queries = sum(x["queries"] - b["queries"] for x, b in zip(after, before))
    hits = sum(x["hits"] - b["hits"] for x, b in zip(after, before))
    per_server = [int(x["requests"] - b["requests"]) for x, b in zip(after, before)]
    used = [c for c in per_server if c] if arm == "one_server" else per_server
    lat = sorted(latencies)
    return {"arm": arm, "workload": name, "hit": hits / queries if queries else 0.0, "queries": queries,
            "per_server": per_server, "spread": max(used) / max(1, min(used)), "wall": wall,
            "p50": a.percentile(lat, 50), "p99": a.percentile(lat, 99), "calls": len(lat),
            "cpu_per_request_ms": 1000 * cpu / max(1, sum(per_server))}


FAKE_METRICS = ("# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
                'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
                'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
                + "".join(f'vllm:other_metric_{i}_bucket{{le="{i}"}} {i}.0\n' for i in range(400))).encode()


def load_cost(count, seconds, interval):
    """A manager over ``count`` servers (16 ports of one fake /metrics server) reading their
    load for ``seconds``: reads done, the client CPU they cost, per read and per second."""

    async def main():
        async def serve(reader, writer):
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                             + str(len(FAKE_METRICS)).encode() + b"\r\nConnection: close\r\n\r\n" + FAKE_METRICS)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        listeners = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(16)]
        ports = [srv.sockets[0].getsockname()[1] for srv in listeners]
        urls = [f"http://127.0.0.1:{ports[i % 16]}/v1" for i in range(count)]
        manager = a.ServerManager(a.configs_for_urls(a.APIServerConfig(base_url=urls[0]), urls),
                                  routing="prefix", server_load_interval=interval)
        manager._enter()  # starts the reader in this loop, as a first call does
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        reads = len(manager.router.reported)
        await manager.close()
        for srv in listeners:
            srv.close()
        return cpu, wall, reads

    cpu, wall, reads = asyncio.run(main())
    print(f"{count} servers, server_load_interval={interval:g} s, {wall:.1f} s: {reads} servers read "
          f"(at most {a.MAX_LOAD_READS_PER_SECOND}/s), client CPU {100 * cpu / wall:.1f}% of a core, "
          f"{1e6 * cpu / max(1, reads):.0f} us a read (server side included: same process)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--count", type=int, default=3)
    s.add_argument("--base-port", type=int, default=BASE_PORT)
    sub.add_parser("stop")
    r = sub.add_parser("run")
    r.add_argument("--urls", default=",".join(f"http://127.0.0.1:{BASE_PORT + i}/v1" for i in range(3)))
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--workloads", default=",".join(WORKLOADS))
    r.add_argument("--scale", type=float, default=1.0, help="sessions per workload, times the issue's")
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("--out", default="")
    r.add_argument("--trace", default="", help="write each request's token ids here (manager arms; for "
                   "sim_routing.py --replay)")
    c = sub.add_parser("load-cost", help="client CPU of reading the servers' load, at many servers")
    c.add_argument("--servers", type=int, default=4096)
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.cmd == "load-cost":
        return load_cost(args.servers, args.seconds, args.interval)
    if args.cmd == "serve":
        return serve(args.count, args.base_port)
    if args.cmd == "stop":
        return stop()
    urls = args.urls.split(",")
    rows, traces = [], []
    for name in args.workloads.split(","):
        for repeat in range(args.repeats):
            sessions = workload(name, args.scale, random.Random(1000 * repeat + ord(name[1])))
            for arm in args.arms.split(","):
                tracer = Tracer() if args.trace and not arm.startswith("router_") else None
                row = run_arm(arm, name, urls, sessions, tracer)
                row["repeat"] = repeat
                rows.append(row)
                if tracer is not None:
                    traces.append(dict(row, events=tracer.replay_events()))
                    with open(args.trace, "w") as f:
                        json.dump(traces, f)
                print(f"{name} {arm:14s} hit {row['hit']:.3f}  per server {row['per_server']}  spread "
                      f"{row['spread']:.2f}  wall {row['wall']:.1f} s  p50 {row['p50']:.3f}  p99 {row['p99']:.3f}  "
                      f"cpu/req {row['cpu_per_request_ms']:.2f} ms", flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
