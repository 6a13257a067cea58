"""Where the CPU of one request through ``ServerManager`` goes: a per-stage breakdown.

The server is the canned-answer ``asyncio.Protocol`` server of ``bench_dispatch.py``
(``--server fast``, ~10 µs per request) in a separate process on loopback, so that the
client's own cost is what is measured.

Three views, all in µs of client CPU per request:

1. **End to end**: ``time.process_time()`` over a closed loop of C requests in flight
   (warm-up excluded), for ``ServerManager.chat_completion`` and for the bare asyncio-streams
   keep-alive loop of ``bench_dispatch.py`` (the floor), side by side, repeated, medians.
2. **Stages in isolation**: each stage of the request path run alone in a tight loop on
   real objects (the same manager, pool, connection and bytes the end-to-end run uses):
   build (body dict, JSON, request bytes), pool (take + release of an idle connection),
   write (the transport's ``write``, the send syscall, timed in place in an end-to-end run: its
   cost depends on what the server process is doing), head read
   + parse, body read, JSON decode, response object, slot bookkeeping (acquire + release),
   deadline (the request timeout), and the manager's layers around ``post`` (``dispatch``,
   ``_request``, accounting) with the HTTP call replaced by a canned answer.  The bare loop's
   own stages are timed the same way.  What is left of the end-to-end figure is the event
   loop: ``select``, socket reads, waking tasks, coroutine switches, GC.
3. ``--cprofile``: cProfile of the end-to-end manager run, own time grouped by stage (the
   profiler inflates small functions, so read it as shares, not as µs).

    python3 bench/profile_request.py                 # ~1 min
    python3 bench/profile_request.py --cprofile      # plus the cProfile attribution
    python3 bench/profile_request.py --concurrency 512 --repeats 5

It times the module's internals on purpose (private names: the pool, the deadline queue, the
encoder, ``_request``); it is a profiler, not a test, and follows them when they change.

The machine is shared: a figure is the median of ``--repeats`` runs (tight loops: the
median of as many batches), and the script prints the outside load it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import atropos_slurm as a  # noqa: E402
import bench_dispatch as bd  # noqa: E402

IN_MEMORY = "whole request in memory (a connection answering each write at once: no socket, no event loop)"
WRITE = "write (transport.write: the send syscall; timed in place, end to end)"
BODY = "body read (a whole body in the reader: size check, StreamReader.read, release)"
KWARGS = {"messages": bd.MESSAGES, "max_tokens": bd.MAX_TOKENS}


def drive(coro):
    """Run a coroutine that must not suspend (all its data is at hand) to its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("the coroutine suspended: its data was not at hand")


def per_call_us(fn, n: int, batches: int) -> float:
    """Median over ``batches`` of the CPU µs per call of ``fn()`` run ``n`` times."""
    results = []
    for _ in range(batches):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        results.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(results)


# =============================================================================================
# End to end
# =============================================================================================


async def end_to_end(client: str, urls, concurrency: int, requests: int) -> float:
    """Client CPU µs per request over a closed loop, warm-up excluded (as bench_dispatch measures)."""
    one, close = await bd.make_client(client, urls, concurrency)
    try:
        await bd.run_load(one, concurrency, max(concurrency * 2, 256))
        gc.collect()
        cpu0 = time.process_time()
        await bd.run_load(one, concurrency, requests)
        return (time.process_time() - cpu0) / requests * 1e6
    finally:
        await close()


async def write_in_place(client: str, urls, concurrency: int, requests: int) -> float:
    """CPU µs per socket-transport ``write`` call (the send syscall) in an end-to-end run, timed in place.

    Under load the send's cost depends on what the other side is doing (waking a sleeping
    server costs more than feeding a busy one), so it is timed where it happens, not alone,
    and in thread CPU time: the woken server may preempt the client in the middle of it.
    The clock's own cost (two ``clock_gettime`` calls) is subtracted.
    """
    from asyncio.selector_events import _SelectorSocketTransport as transport  # ours and StreamWriter.write's
    original, spent, calls = transport.write, [0], [0]
    clock = time.thread_time_ns

    def timed_write(self, data):
        t0 = clock()
        original(self, data)
        spent[0] += clock() - t0
        calls[0] += 1
    transport.write = timed_write
    try:
        one, close = await bd.make_client(client, urls, concurrency)
        try:
            await bd.run_load(one, concurrency, max(concurrency * 2, 256))
            spent[0], calls[0] = 0, 0
            await bd.run_load(one, concurrency, requests)
        finally:
            await close()
    finally:
        transport.write = original
    t0 = clock()
    for _ in range(10000):
        clock()
    clock_ns = (clock() - t0) / 10000
    return (spent[0] / max(calls[0], 1) - clock_ns) / 1e3


# =============================================================================================
# Stages in isolation
# =============================================================================================


async def ours_stages(url: str, n: int, batches: int) -> dict:
    """Each stage of ``ServerManager.chat_completion`` alone, on real objects; µs per request."""
    template = a.ServerBaseline(timeout=60, model_name=bd.MODEL, num_max_requests_at_once=512)
    manager = a.ServerManager(a.configs_for_urls(template, [url]))
    server = manager.servers[0]
    pool = server._pool
    response = await manager.chat_completion(**KWARGS)  # opens the connection, fills the caches
    conn = pool._take_idle(asyncio.get_running_loop())
    pool.release(conn, True)
    raw = response.raw
    stages = {}

    # build: the body dict, its JSON, the request bytes (as OpenAIServer.post does)
    start = server._post_heads[server._prefix + "/chat/completions"]

    def build():
        body = server.request_body("/chat/completions", KWARGS)
        payload = a._json_compact(body).encode()
        return b"%sContent-Length: %d\r\n\r\n%s" % (start, len(payload), payload)
    request = build()
    stages["build (body dict, JSON encode, request bytes)"] = per_call_us(build, n, batches)

    def pool_take_release():
        c = pool._take_idle(asyncio.get_running_loop())
        pool.release(c, True)
    stages["pool (take idle + release)"] = per_call_us(pool_take_release, n, batches)

    # write: timed in place during an end-to-end run (write_in_place); here only an answer to keep
    conn = pool._take_idle(asyncio.get_running_loop())
    reader, writer = conn.reader, conn.writer
    # one whole answer, as it sits in the reader's buffer after the event loop read it
    writer.write(request)
    head_block = await reader.readuntil(b"\r\n\r\n")
    head = a.parse_response_head(head_block[:-4])
    body = await reader.readexactly(head.content_length)
    pool.release(conn, True)
    answer = head_block + body

    def read_head():
        r = asyncio.StreamReader(limit=a.MAX_HEADER_BYTES)
        r.feed_data(answer)
        return drive(r.readuntil(b"\r\n\r\n"))
    empty_reader = per_call_us(lambda: asyncio.StreamReader(limit=a.MAX_HEADER_BYTES).feed_data(answer), n, batches)
    stages["head read (StreamReader.readuntil, data buffered)"] = per_call_us(read_head, n, batches) - empty_reader
    stages["head parse (parse_response_head)"] = per_call_us(lambda: a.parse_response_head(head_block[:-4]), n, batches)

    # body read: as ConnectionPool.send reads a body already whole in the reader (size check,
    # StreamReader.read, release)
    def read_body():
        r = asyncio.StreamReader(limit=a.MAX_HEADER_BYTES)
        r.feed_data(body)
        c = a._Connection(r, writer)
        length = head.content_length
        if not (len(r._buffer) == length <= pool.max_body_bytes and head.has_body):
            raise RuntimeError("the body is not whole in the reader")
        data = drive(r.read(length))
        pool.release(c, head.keep_alive)
        pool._idle.pop()
        return data
    stages[BODY] = per_call_us(read_body, n, batches) - empty_reader

    stages["JSON decode (_loads_attr: AttrDict per object)"] = per_call_us(lambda: a._loads_attr(raw), n, batches)
    data = a._loads_attr(raw)

    def response_object():  # decode_response minus the JSON decode: the shape and abort checks, the copy
        r = a.APIResponse(data)
        r.raw = raw
        for choice in r["choices"]:
            if not isinstance(choice, dict) or choice.get("finish_reason") == "abort":
                raise RuntimeError("unexpected choice")
        return r
    stages["response object (APIResponse copy, choices and abort check)"] = per_call_us(response_object, n, batches)

    def slots():
        s = drive(manager.slot_source.acquire("train", None))
        manager.slots.give_back(s, "train")
    stages["slot bookkeeping (SharedSlots.acquire + Slots.give_back)"] = per_call_us(slots, n, batches)

    # deadline: the timeout message, the timer queue check, enter + exit (needs a task)
    async def deadlines():
        loop = asyncio.get_running_loop()

        def one():
            timers = server._timers
            if timers is None or timers.loop is not loop or timers.seconds != server.config.timeout:
                raise RuntimeError("no deadline queue")
            with a._Deadline(server.config.timeout, f"no response within timeout={server.config.timeout:g} s",
                             server.url, timers):
                pass
        return per_call_us(one, n, batches)
    stages["deadline (request timeout: message, queue, enter/exit)"] = await asyncio.ensure_future(deadlines())

    # the whole path in memory: a connection whose every write is answered at once, in the reader
    loopback = LoopbackWriter(answer)
    pool.release(a._Connection(loopback.reader, loopback), True)

    async def whole():
        def one():
            return drive(manager.chat_completion(**KWARGS)).choices[0].message.content
        return per_call_us(one, n, batches)
    send_soon = a._send_soon  # no loop iteration ends here: each request is written at once
    a._send_soon = lambda loop, transport, data: transport.write(data)
    try:
        stages[IN_MEMORY] = await asyncio.ensure_future(whole())
    finally:
        a._send_soon = send_soon
    pool._idle.clear()

    # the manager's layers: chat_completion -> dispatch -> _request with post() answering at once
    canned = a.decode_response(raw, url)

    async def post(*args, **kwargs):
        return canned
    server.post = post
    layers = per_call_us(lambda: drive(manager.chat_completion(**KWARGS)), n, batches)
    del server.post
    stages["manager layers (dispatch, _request, accounting; incl. slots)"] = layers
    await manager.close()
    return stages


class LoopbackWriter:
    """A StreamWriter stand-in whose every write puts ``answer`` in ``reader``: no socket, no wait."""

    def __init__(self, answer: bytes):
        self.reader, self.answer, self.transport = asyncio.StreamReader(limit=a.MAX_HEADER_BYTES), answer, self

    def write(self, data):
        self.reader.feed_data(self.answer)

    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return False

    async def drain(self):
        pass

    def close(self):
        pass


async def bare_stages(url: str, n: int, batches: int) -> dict:
    """The bare loop's stages, alone, the same way (see make_client('bare') in bench_dispatch.py)."""
    import re
    _, host, port, prefix = a.parse_base_url(url)
    reader, writer = await asyncio.open_connection(host, port)
    host_b, path = f"{host}:{port}".encode(), (prefix + "/chat/completions").encode()

    def build():
        body = json.dumps({"model": bd.MODEL, "messages": bd.MESSAGES, "max_tokens": bd.MAX_TOKENS}).encode()
        return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (path, host_b, len(body), body))
    request = build()
    stages = {"build (body dict, JSON encode, request bytes)": per_call_us(build, n, batches)}
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    size = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    body = await reader.readexactly(size)
    answer = head + body
    writer.close()
    empty_reader = per_call_us(lambda: asyncio.StreamReader().feed_data(answer), n, batches)

    def read_head():
        r = asyncio.StreamReader()
        r.feed_data(answer)
        return drive(r.readuntil(b"\r\n\r\n"))
    stages["head read (StreamReader.readuntil, data buffered)"] = per_call_us(read_head, n, batches) - empty_reader
    stages["head parse (parse_response_head)"] = per_call_us(
        lambda: (head.startswith(b"HTTP/1.1 200"), int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))),
        n, batches)

    def read_body():
        r = asyncio.StreamReader()
        r.feed_data(body)
        return drive(r.readexactly(size))
    stages[BODY] = per_call_us(read_body, n, batches) - empty_reader
    stages["JSON decode (_loads_attr: AttrDict per object)"] = per_call_us(lambda: json.loads(body), n, batches)
    loopback = LoopbackWriter(answer)

    async def one():  # make_client('bare')'s request, on the loopback connection
        r, w = loopback.reader, loopback
        payload = json.dumps({"model": bd.MODEL, "messages": bd.MESSAGES, "max_tokens": bd.MAX_TOKENS}).encode()
        w.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (path, host_b, len(payload), payload))
        h = await r.readuntil(b"\r\n\r\n")
        if not h.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("bad answer")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", h)
        return json.loads(await r.readexactly(int(m.group(1))))["choices"][0]["message"]["content"]
    stages[IN_MEMORY] = per_call_us(lambda: drive(one()), n, batches)
    return stages


# =============================================================================================
# cProfile attribution
# =============================================================================================

STAGE_OF = [  # (substring of the function name, stage); first match wins
    ("request_body", "build"), ("JSONEncoder", "build"), ("encode", "build"), ("dumps", "build"),
    ("_take_idle", "pool"), ("release", "pool"), ("usable", "pool"), ("at_eof", "pool"), ("is_closing", "pool"),
    ("'send' of '_socket", "write"), ("'recv' of '_socket", "event loop"), ("write", "write"), ("drain", "write"),
    ("readuntil", "head read"), ("parse_response_head", "head parse"), ("_STATUS_LINE", "head parse"),
    ("match", "head parse"), ("partition", "head parse"), ("strip", "head parse"), ("ResponseHead", "head parse"),
    ("readexactly", "body read"), ("_read_body", "body read"), ("_read_pieces", "body read"), ("feed", "body read"), ("body_framer", "body read"), ("_ReadingBody", "body read"), ("_count", "body read"), ("'read'", "body read"),
    ("_loads_attr", "JSON decode"), ("decode", "JSON decode"), ("raw_decode", "JSON decode"),
    ("detect_encoding", "JSON decode"), ("AttrDict", "JSON decode"),
    ("decode_response", "response object"), ("check_not_aborted", "response object"),
    ("acquire", "slots"), ("give_back", "slots"), ("select", "slots"), ("_enqueue", "slots"), ("_hand_over", "slots"), ("take", "slots"),
    ("current_task", "deadline"),
    ("dispatch", "manager layers"), ("_request", "manager layers"), ("chat_completion", "manager layers"),
    ("'post'", "post/send coroutines"), ("post", "post/send coroutines"), ("send", "post/send coroutines"),
    ("select", "event loop"), ("_run_once", "event loop"), ("_read_ready", "event loop"), ("recv", "event loop"),
    ("data_received", "event loop"), ("feed_data", "event loop"), ("_wakeup", "event loop"), ("__step", "event loop"),
    ("_run", "event loop"), ("set_result", "event loop"), ("call_soon", "event loop"), ("_wait_for_data", "event loop"),
    ("create_future", "event loop"),
]


def cprofile_attribution(url: str, concurrency: int, requests: int) -> list:
    """Own time of the manager's end-to-end run, grouped by stage: [(stage, share, top functions)]."""
    import cProfile
    import pstats

    async def run():
        one, close = await bd.make_client("ours", [url], concurrency)
        await bd.run_load(one, concurrency, 512)
        prof = cProfile.Profile()
        prof.enable()
        await bd.run_load(one, concurrency, requests)
        prof.disable()
        await close()
        return prof
    stats = pstats.Stats(asyncio.run(run())).stats
    groups, total = {}, 0.0
    # cProfile names functions without their class: the deadline's methods are found by line.
    deadline_lines = set()
    for cls in (a._Deadline, a._DeadlineQueue):
        source, first = inspect.getsourcelines(cls)
        deadline_lines.update(range(first, first + len(source)))
    for (filename, line, func), (_, _, tottime, _, _) in stats.items():
        key = f"{os.path.basename(filename)}:{func}"
        if os.path.basename(filename) == "bench_dispatch.py":
            stage = "benchmark harness"
        elif filename == a.__file__ and line in deadline_lines:
            stage = "deadline"
        else:
            stage = next((s for sub, s in STAGE_OF if sub in func), "other")
        total += tottime
        g = groups.setdefault(stage, [0.0, []])
        g[0] += tottime
        g[1].append((tottime, key))
    rows = []
    for stage, (t, funcs) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        top = ", ".join(f"{k} {v / total:.0%}" for v, k in sorted(funcs, reverse=True)[:3])
        rows.append((stage, t / total, top))
    return rows


# =============================================================================================
# Report
# =============================================================================================


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=20000, help="measured requests per end-to-end run (20000)")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end runs per client, alternating (3)")
    p.add_argument("--loops", type=int, default=20000, help="calls per tight-loop batch (20000)")
    p.add_argument("--batches", type=int, default=5, help="tight-loop batches; the median is shown (5)")
    p.add_argument("--cprofile", action="store_true", help="also group a cProfile of the manager's run by stage")
    args = p.parse_args(argv)

    server = bd.ServerProcess("fast", 1, 0.0)
    url = server.urls[0]
    try:
        busy0, wall0 = bd._machine_busy(), time.perf_counter()
        cpu_self0, srv0 = time.process_time(), bd._proc_cpu(server.proc.pid)
        e2e = {"ours": [], "bare": []}
        for rep in range(args.repeats):
            for client in (("ours", "bare") if rep % 2 == 0 else ("bare", "ours")):
                e2e[client].append(asyncio.run(end_to_end(client, [url], args.concurrency, args.requests)))
        ours = asyncio.run(ours_stages(url, args.loops, args.batches))
        bare = asyncio.run(bare_stages(url, args.loops, args.batches))
        for stages, client in ((ours, "ours"), (bare, "bare")):
            stages[WRITE] = statistics.median(
                asyncio.run(write_in_place(client, [url], args.concurrency, args.requests // 2)) for _ in range(args.repeats))
        wall = time.perf_counter() - wall0
        other = (bd._machine_busy() - busy0 - (time.process_time() - cpu_self0)
                 - (bd._proc_cpu(server.proc.pid) - srv0)) / wall
        attribution = cprofile_attribution(url, args.concurrency, args.requests) if args.cprofile else None
    finally:
        server.stop()

    e_ours, e_bare = statistics.median(e2e["ours"]), statistics.median(e2e["bare"])
    print("# One request through ServerManager: client CPU per stage (µs/request)\n")
    print(f"fast canned-answer server in another process, 1 server, {args.concurrency} in flight; "
          f"Python {sys.version.split()[0]}; end to end: median of {args.repeats} runs of {args.requests:,} "
          f"requests; stages: median of {args.batches} batches of {args.loops:,} calls; "
          f"outside load during the runs: {max(other, 0):.2f} cores\n")
    print("| stage | ours | bare loop |")
    print("|---|---:|---:|")
    layer_key = "manager layers (dispatch, _request, accounting; incl. slots)"
    summed_ours = summed_bare = 0.0
    order = list(ours)
    order.remove(WRITE)
    order.insert(2, WRITE)  # after build and pool, where it happens
    for stage in order:
        us = ours[stage]
        if stage in (layer_key, IN_MEMORY):
            continue
        b = bare.get(stage)
        summed_ours += us
        summed_bare += b or 0.0
        print(f"| {stage} | {us:.2f} | {'-' if b is None else f'{b:.2f}'} |")
    slots = ours["slot bookkeeping (SharedSlots.acquire + Slots.give_back)"]
    print(f"| {layer_key} | {ours[layer_key]:.2f} (of which slots {slots:.2f}) | - |")
    summed_ours += ours[layer_key] - slots
    print(f"| **sum of the stages** | **{summed_ours:.1f}** | **{summed_bare:.1f}** |")
    print(f"| event loop, socket reads, task switches, GC (end to end minus the stages) | "
          f"{e_ours - summed_ours:.1f} | {e_bare - summed_bare:.1f} |")
    print(f"| **end to end (process CPU / requests)** | **{e_ours:.1f}** | **{e_bare:.1f}** |")
    print(f"| {IN_MEMORY} | {ours[IN_MEMORY]:.1f} | {bare[IN_MEMORY]:.1f} |")
    print(f"\nend to end runs, µs/request: ours {', '.join(f'{x:.1f}' for x in e2e['ours'])}; "
          f"bare {', '.join(f'{x:.1f}' for x in e2e['bare'])}; ratio of medians {e_ours / e_bare:.2f}x")
    if attribution:
        print("\n## cProfile of the manager's end-to-end run, own time by stage (shares; the profiler "
              "inflates small calls)\n")
        print("| stage | share | top functions |")
        print("|---|---:|---|")
        for stage, share, top in attribution:
            print(f"| {stage} | {share:.0%} | {top} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
