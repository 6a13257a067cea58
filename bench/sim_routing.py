"""Routing at cluster scale, by simulation: the real selection code over a model of vLLM's prefix cache.

The model (``PrefixCache``) is vLLM v1's automatic prefix caching: the prompt is cut into
full blocks of ``block`` tokens, each block keyed by the hash of its tokens chained to its
parent's; a request hits the longest run of cached blocks from the start, at most
``(prompt - 1) // block`` blocks (the last token is always computed); the generated tokens'
full blocks are cached too; ``capacity`` blocks per server, least recently used evicted first
(a finished request's blocks freed deepest first, as vLLM frees them).  Counters as vLLM's
``prefix_cache_queries`` (prompt tokens, per sequence: ``n`` sequences query the prompt ``n``
times) and ``prefix_cache_hits``.

The selection is the module's own: ``Slots`` + ``PrefixRouter`` + ``route_keys`` on stand-in
server objects, driven by a discrete-event clock (service time grows with uncached prompt
tokens and generated tokens).  Arms: ``round_robin``, ``prefix``, and the bound (one server of
the summed capacity, where every prefix can hit).

    python bench/sim_routing.py --servers 64,512            # the RL-shaped traces
    python bench/sim_routing.py --replay /tmp/trace.json     # check the model on a real run's trace

``--replay`` reads a trace written by ``bench_routing.py run --trace``: each request's server,
prompt and output token ids as vLLM reported them, and the servers' counter deltas.
"""

import argparse
import heapq
import json
import os
import random
import sys
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atropos_slurm as a  # noqa: E402


class PrefixCache:
    """One server's prefix cache (see the module docstring)."""

    def __init__(self, block: int, capacity: int):
        self.block, self.capacity = block, capacity
        self.blocks: "OrderedDict[int, None]" = OrderedDict()
        self.queries = self.hits = 0

    def hashes(self, tokens, start=(), done=0):
        """Chained block hashes of ``tokens``' full blocks; ``start``: the hashes of its first
        ``done`` blocks, already known (a conversation's earlier turns)."""
        out, b = list(start[:done]), self.block
        key = out[-1] if out else 0
        for i in range(done * b, len(tokens) - len(tokens) % b, b):
            key = hash((key, tuple(tokens[i:i + b])))
            out.append(key)
        return out

    def query(self, tokens, hashes, n=1):
        """Count ``n`` sequences' lookups of this prompt; the first computes, the others hit it."""
        most = (len(tokens) - 1) // self.block
        hit = 0
        for key in hashes[:most]:
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            hit += 1
        self.queries += n * len(tokens)
        self.hits += hit * self.block + (n - 1) * most * self.block
        self.store(hashes)

    def store(self, hashes):
        blocks = self.blocks
        for key in reversed(hashes):  # the deepest are the first evicted
            blocks[key] = None
            blocks.move_to_end(key)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class Server:
    """A simulated server: its cache and its count of sequences (``Slots`` keeps the rest)."""

    def __init__(self, i, cache, cap):
        self.name, self.cache, self.requests = f"s{i}", cache, 0


# -- RL-shaped traces: sessions of requests, each request's messages and its answer ----------------

IM_START, IM_END, ROLES = 1, 2, {"system": 3, "user": 4, "assistant": 5}


_TOKENS = {}


def tokens_of(text):
    ids = _TOKENS.get(text)
    if ids is None:
        ids = _TOKENS[text] = [int(w) for w in text.split()]
    return ids


def render(messages):
    """Token ids of a chat prompt (a ChatML-like template), ending with the assistant's header."""
    out = []
    for m in messages:
        out += [IM_START, ROLES[m["role"]]]
        out += tokens_of(m["content"])
        out.append(IM_END)
    return out + [IM_START, ROLES["assistant"]]


def words(rng, count):
    return " ".join(str(rng.randrange(10, 30000)) for _ in range(count))


def episodes(rng, count, turns, system, task, obs, answer):
    """Multi-turn episodes (a shared system prompt, a task, observations and answers); the number
    of turns varies, uniformly from half to 1.5x ``turns``."""
    shared = words(rng, system)
    for _ in range(count):
        yield {"kind": "episode", "system": shared, "task": words(rng, task),
               "turns": rng.randint(turns // 2, turns * 3 // 2), "obs": obs,
               "answer": answer}


def groups(rng, count, header, question, n, part):
    shared = words(rng, header)
    for _ in range(count):
        yield {"kind": "group", "messages": [{"role": "system", "content": shared},
                                             {"role": "user", "content": words(rng, question)}],
               "n": n, "part": part, "answer": 64}


TRACES = {
    # name: (sessions per server, builder(rng, sessions))
    "multi_turn": (6, lambda rng, k: episodes(rng, k, 6, 500, 100, 30, 32)),
    "agentic": (3, lambda rng, k: episodes(rng, k, 24, 1000, 200, 250, 100)),  # 12-36 turns, 4k-13k tokens
    "grpo": (4, lambda rng, k: groups(rng, k, 300, 300, 16, 4)),
}


# -- the discrete-event simulation --------------------------------------------------------------

def simulate(trace, servers_count, routing, block, capacity, concurrency_per_server, generations, seed=0):
    """Run ``generations`` x the concurrent sessions; a finished session is replaced by a new one."""
    rng = random.Random(seed)
    per_server, build = TRACES[trace]
    concurrent = per_server * servers_count
    sessions = list(build(random.Random(seed + 1), concurrent * generations))
    servers = [Server(i, PrefixCache(block, capacity), concurrency_per_server) for i in range(servers_count)]
    slots = a.Slots(servers, caps=[(concurrency_per_server, concurrency_per_server)] * servers_count)
    records = slots.records  # what the selection reads and returns; .server is ours
    router = a.PrefixRouter(records) if routing == "prefix" else None
    clock, events, seq = 0.0, [], 0
    waiting = []  # requests waiting for a slot, FIFO
    state = {}

    def start_session(index):
        s = sessions[index]
        if s["kind"] == "episode":
            messages = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["task"]}]
            state[index] = {"messages": messages, "turn": 0, "hashes": [], "done_blocks": 0}
            submit(index, messages, 1)
        else:
            state[index] = {"parts": s["n"] // s["part"], "hashes": [], "done_blocks": 0}
            for _ in range(s["n"] // s["part"]):
                submit(index, s["messages"], s["part"])

    def submit(index, messages, n):
        waiting.append((index, messages, n))
        dispatch()

    def dispatch():
        nonlocal seq
        while waiting:
            index, messages, n = waiting[0]
            route = a.route_keys({"messages": messages}) if router else None
            prefer, spill = router.choose(route, slots) if router else (None, None)
            slot = slots.take("train", spill, prefer)
            if slot is None:
                return
            waiting.pop(0)
            if router:
                router.placed(route, slot)
            server = slot.server
            st = state[index]
            tokens = render(messages)
            st["hashes"] = server.cache.hashes(tokens, st["hashes"], min(st["done_blocks"], len(tokens) // block))
            st["done_blocks"] = len(st["hashes"])
            hits_before = server.cache.hits
            server.cache.query(tokens, st["hashes"], n)
            server.requests += n
            uncached = n * len(tokens) - (server.cache.hits - hits_before)
            answer_len = sessions[index]["answer"]
            busy = slot.in_flight["train"]
            service = (0.02 + uncached * 2e-5 + answer_len * 0.01) * (1 + busy / 32) * rng.uniform(0.8, 1.2)
            seq += 1
            heapq.heappush(events, (clock + service, seq, index, slot, route, messages, tokens, n))

    for index in range(concurrent):
        start_session(index)
    next_session = concurrent
    while events:
        clock, _, index, slot, route, messages, tokens, n = heapq.heappop(events)
        server = slot.server
        s, st = sessions[index], state[index]
        answers = [words(rng, s["answer"]) for _ in range(n)]
        # the generated tokens' full blocks are cached too
        for answer in answers[:1]:
            full = tokens + tokens_of(answer)
            server.cache.store(server.cache.hashes(full, st["hashes"], len(st["hashes"])))
        slots.give_back(slot, "train")
        if router:
            router.answered(route, slot, {"choices": [{"message": {"content": x}} for x in answers]})
        finished = True
        if s["kind"] == "episode":
            st["turn"] += 1
            if st["turn"] < s["turns"]:
                finished = False
                st["messages"] = messages + [{"role": "assistant", "content": answers[0]},
                                             {"role": "user", "content": words(rng, s["obs"])}]
                submit(index, st["messages"], 1)
        else:
            st["parts"] -= 1
            finished = st["parts"] == 0
        if finished:
            state.pop(index)
            if next_session < len(sessions):
                start_session(next_session)
                next_session += 1
        dispatch()
    queries = sum(x.cache.queries for x in servers)
    hits = sum(x.cache.hits for x in servers)
    counts = [x.requests for x in servers]
    return {"hit": hits / queries, "spread": max(counts) / max(1, min(counts)), "spilled": router.spilled if router else 0,
            "matched": router.matched if router else 0, "index": router.remembered if router else 0}


def replay(path, block, capacity):
    """The model on a real run's trace: predicted hit rate vs the servers' counters."""
    with open(path) as f:
        runs = json.load(f)
    rows = []
    for run in runs:
        caches = {}
        for event in run["events"]:  # in the order the client saw them: start (prompt) and end (+ output)
            cache = caches.setdefault(event["url"], PrefixCache(block, capacity))
            tokens = event["prompt"]
            hashes = cache.hashes(tokens)
            if event["kind"] == "start":
                cache.query(tokens, hashes, event["n"])
            else:
                for output in event["outputs"]:
                    cache.store(cache.hashes(tokens + output))
        queries = sum(c.queries for c in caches.values())
        hits = sum(c.hits for c in caches.values())
        rows.append({"arm": run["arm"], "workload": run["workload"], "model": hits / queries,
                     "servers": run["hit"], "model_queries": queries, "server_queries": run["queries"]})
        print(f"{run['workload']} {run['arm']:12s} model {hits / queries:.3f}  servers {run['hit']:.3f}  "
              f"difference {100 * (hits / queries - run['hit']):+.1f} points  (queries {queries} vs "
              f"{run['queries']:.0f})")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="64,512")
    p.add_argument("--traces", default=",".join(TRACES))
    p.add_argument("--block", type=int, default=16, help="tokens per cache block (vLLM's GPU default 16)")
    p.add_argument("--capacity", type=int, default=32768, help="blocks per server (32768 x 16 = 512k tokens)")
    p.add_argument("--cap", type=int, default=64, help="requests in flight per server (num_max_requests_at_once)")
    p.add_argument("--generations", type=int, default=4, help="sessions per concurrent slot, one after another")
    p.add_argument("--replay", default="")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.replay:
        rows = replay(args.replay, args.block, args.capacity)
    else:
        rows = []
        for trace in args.traces.split(","):
            for count in map(int, args.servers.split(",")):
                started = time.monotonic()
                _TOKENS.clear()
                # the bound: one server of the summed capacity, every session on it (same sessions)
                bound_hit = _bound(trace, count, args)
                row = {"trace": trace, "servers": count, "bound": bound_hit}
                for routing in ("round_robin", "prefix"):
                    r = simulate(trace, count, routing, args.block, args.capacity, args.cap, args.generations)
                    row[routing] = r
                rows.append(row)
                pre, rr = row["prefix"], row["round_robin"]
                print(f"{trace:10s} {count:4d} servers: bound {bound_hit:.3f}  round-robin {rr['hit']:.3f} "
                      f"({rr['hit'] / bound_hit:.3f} of it, spread {rr['spread']:.2f})  prefix {pre['hit']:.3f} "
                      f"({pre['hit'] / bound_hit:.3f} of it, spread {pre['spread']:.2f}, spilled {pre['spilled']}, "
                      f"index {pre['index']} keys)  [{time.monotonic() - started:.0f} s]", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _bound(trace, count, args):
    """One server holding every session of the ``count``-server run, with their summed capacity."""
    per_server, build = TRACES[trace]
    saved = TRACES[trace]
    TRACES[trace] = (per_server * count, build)
    try:
        return simulate(trace, 1, "round_robin", args.block, args.capacity * count, args.cap * count,
                        args.generations)["hit"]
    finally:
        TRACES[trace] = saved


if __name__ == "__main__":
    main()
