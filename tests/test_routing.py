"""Routing: prefix affinity (``PrefixRouter``, ``route_keys``) with ``Slots.take(prefer=...)``, as
table tests without sockets; then through ``ServerManager`` against stub servers.

The real servers' prefix caches are measured in tests/test_vllm_interop.py (``PrefixAffinity``)
and bench/bench_routing.py.  Run: ``python -m pytest tests/test_routing.py -q``.
"""

import asyncio
import os
import sys
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atropos_slurm as a  # noqa: E402
from tests.support import LIMIT, LoopThread, make_manager, mute_logs  # noqa: E402


class Server:
    """What ``Slots`` and ``PrefixRouter`` read on a server."""

    def __init__(self, name, train=8, eval=2):
        self.name, self.healthy = name, True
        self.in_flight = {"train": 0, "eval": 0}
        self.caps = {"train": train, "eval": eval}

    def __repr__(self):
        return self.name


SYSTEM = {"role": "system", "content": "You are a careful agent. " * 20}


def chat(*turns):
    """A conversation: the system prompt, then user/assistant turns alternating."""
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def answer_chat(text, n=1):
    return {"choices": [{"message": {"role": "assistant", "content": text}} for _ in range(n)]}


class Dispatch:
    """The manager's routing step, without I/O: keys, prefer, take, placed (and answered)."""

    def __init__(self, count=3, epsilon=0.25, entries=1000, train=8, eval=2):
        self.slots = a.Slots([f"s{i}" for i in range(count)], caps=[(train, eval)] * count)
        self.servers = self.slots.records  # what Slots and PrefixRouter read: health, in flight, caps
        self.router = a.PrefixRouter(self.servers, epsilon, entries)

    def send(self, kwargs, split="train", avoid=None):
        route = a.route_keys(kwargs)
        prefer, spill = self.router.choose(route, self.slots) if route else (None, None)
        server = self.slots.take(split, avoid or spill, prefer)
        if server is not None and route:
            self.router.placed(route, server)
        return route, server

    def call(self, kwargs, response, split="train"):
        """Send, answer, give the slot back; the server."""
        route, server = self.send(kwargs, split)
        self.slots.give_back(server, split)
        self.router.answered(route, server, response)
        return server


class Selection(unittest.TestCase):
    def test_a_conversation_stays_where_its_history_is(self):
        d = Dispatch()
        first = [d.call(chat(f"task {i}"), answer_chat(f"step {i}")) for i in range(3)]
        self.assertEqual(first, d.servers, "new conversations (one system prompt) are placed round-robin")
        for i in range(3):
            turns = [f"task {i}", f"step {i}"]
            for t in range(4):
                turns.append(f"observation {t}")
                server = d.call(chat(*turns), answer_chat(f"step {i}.{t}"))
                self.assertIs(server, first[i], (i, t))
                turns.append(f"step {i}.{t}")
        self.assertEqual(d.router.matched, 12)

    def test_a_conversation_found_by_its_last_prompt_when_the_answer_was_rewritten(self):
        d = Dispatch()
        home = d.call(chat("task"), answer_chat("<think>hm</think> go"))
        d.call(chat("other"), answer_chat("x"))
        self.assertIs(d.call(chat("task", "go", "next"), answer_chat("y")), home,
                      "the answer kept in the history differs: found by the earlier prompt's key")
        self.assertIs(d.call(chat("task", "go", "next", "y", "more"), answer_chat("z")), home)
        self.assertEqual(d.router.matched, 2)

    def test_split_parts_and_repeats_of_a_prompt_go_together(self):
        d = Dispatch()
        group = chat("question 7")
        parts = [d.send(dict(group, n=4))[1] for _ in range(4)]
        self.assertEqual(parts, [d.servers[0]] * 4)
        self.assertIs(d.send(chat("question 8"))[1], d.servers[1], "the next group goes round-robin")

    def test_text_prompts_and_token_ids(self):
        d = Dispatch()
        text = "Once upon a time " * 20
        home = d.call({"prompt": text}, {"choices": [{"text": " there was a king " * 10}]})
        d.call({"prompt": "unrelated " * 40}, {"choices": [{"text": "z"}]})
        self.assertIs(d.send({"prompt": text + " there was a king " * 10 + "who"})[1], home)
        ids = list(range(100))
        home = d.send({"input_ids": ids})[1]
        self.assertIs(d.send({"prompt": ids})[1], home, "input_ids or prompt: the same ids")
        self.assertIsNone(a.route_keys({"prompt": [1, "x"]}), "nothing to key by: round-robin")
        self.assertIsNone(a.route_keys({}))
        for role in (["user"], {"a": 1}):  # not a string: keyed all the same, the server says what is wrong
            messages = [{"role": role, "content": "hi"}]
            self.assertEqual(a.route_keys({"messages": messages}), a.route_keys({"messages": messages}))

    def test_a_short_answer_adds_no_key_a_shared_prefix_could_own(self):
        keys = a.route_keys({"prompt": "h" * a.ROUTE_BLOCK_CHARS * 3 + "q"})
        self.assertIsNone(keys.after({"text": "ok"}), "no new full block: the key would be the prompt's own prefix")
        self.assertIsNotNone(keys.after({"text": "x" * a.ROUTE_BLOCK_CHARS}))

    def test_answers_without_text_teach_nothing(self):
        d = Dispatch(entries=10)
        route, server = d.send(chat("a"))
        for response in ({}, {"choices": None}, {"choices": []}, (1, 2), None, [{"x": 1}]):
            d.router.answered(route, server, response)
        self.assertEqual(d.router.remembered, 1, "only the prompt's key")
        for choice in ({}, {"message": None}, {"message": "text"}, {"message": {"content": None}}):
            d.router.answered(route, server, {"choices": [choice]})
        self.assertEqual(d.router.remembered, 2, "an answer it cannot read is keyed as an empty one")

    def test_the_deepest_match_wins(self):
        d = Dispatch()
        d.call(chat("a"), answer_chat("b"))  # s0 holds [a, b]
        d.send(chat("x"))  # s1
        d.call(chat("a", "b", "c"), answer_chat("d"))  # continues on s0
        d.slots.set_healthy(d.servers[0], False)  # [a, b, c, d, e] goes elsewhere, then s0 is back
        moved = d.call(chat("a", "b", "c", "d", "e"), answer_chat("f"))
        self.assertIsNot(moved, d.servers[0])
        d.slots.set_healthy(d.servers[0], True)
        self.assertIs(d.send(chat("a", "b", "c", "d", "e", "f", "g"))[1], moved,
                      "the deepest key names the new server, though a shallower one names s0")

    def test_eviction_least_recently_used_first(self):
        d = Dispatch(entries=2)
        d.send(chat("one"))  # s0
        d.send(chat("two"))  # s1
        self.assertIs(d.send(chat("one"))[1], d.servers[0], "a hit refreshes the key")
        d.send(chat("three"))  # s2: "two" is the least recently used, dropped
        self.assertEqual(d.router.remembered, 2)
        self.assertIs(d.send(chat("one"))[1], d.servers[0])
        self.assertIs(d.send(chat("two"))[1], d.servers[1], "forgotten: placed as new, s0 (3 of 5 in flight) over the bound")


class Bounds(unittest.TestCase):
    def test_load_bound_spills_a_hot_prefix(self):
        # 3 servers, epsilon 0.25, slack 4.
        d = Dispatch(count=3, train=100)
        placed = [d.send(chat("hot"))[1] for _ in range(12)]
        # s0 holds all t in flight: preferred while t + 1 <= ceil(1.25 * (t + 1) / 3) + 4, i.e. t < 8;
        # the 9th spills to the next in line, and the prompt's key moves with it.
        self.assertEqual(placed, [d.servers[0]] * 8 + [d.servers[1]] * 4)
        self.assertEqual(d.router.spilled, 1)
        table = [  # in flight elsewhere, in flight on s0 -> s0 still preferred?
            (0, 7, True), (0, 8, False), (30, 28, True), (30, 29, False),
        ]
        for others, mine, preferred in table:
            with self.subTest(others=others, mine=mine):
                d = Dispatch(count=3, train=100)
                route = a.route_keys(chat("hot"))
                d.router.placed(route, d.servers[0])
                d.servers[0].in_flight["train"] = mine
                d.servers[1].in_flight["train"] = others
                d.slots.in_flight_totals["train"] = mine + others
                # bound = ceil(1.25 * (total + 1) / 3) + 4
                self.assertEqual(d.router.choose(route, d.slots)[0] is d.servers[0], preferred)

    def test_reported_load_bounds_too(self):
        d = Dispatch(count=2, train=100)
        route = a.route_keys(chat("hot"))
        d.router.placed(route, d.servers[0])
        d.router.report(d.servers[0], 40)  # other processes' requests: ceil(1.25 * 41 / 2) + 4 = 30 < 41
        d.router.report(d.servers[1], 0)
        self.assertEqual(d.router.choose(route, d.slots), (d.servers[1], d.servers[0]), "spilled to the next within")
        d.router.report(d.servers[1], 20)
        d.router.report(d.servers[0], 20)
        self.assertEqual(d.router.reported_total, 40)
        self.assertEqual(d.router.choose(route, d.slots), (d.servers[0], None))

    def test_epsilon_zero_and_ties(self):
        d = Dispatch(count=2, epsilon=0.0, train=100)
        placed = [d.send(chat("hot"))[1] for _ in range(12)]
        # bound with epsilon 0 = ceil((t + 1) / 2) + 4: s0 takes 9 (the tie t + 1 = bound is within).
        self.assertEqual(placed, [d.servers[0]] * 9 + [d.servers[1]] * 3)


class Slots(unittest.TestCase):
    def test_caps_full_on_the_preferred_server(self):
        d = Dispatch(count=2, train=1)
        route, home = d.send(chat("a"))
        self.assertIs(home, d.servers[0])
        route, server = d.send(chat("a"))
        self.assertIs(server, d.servers[1], "at its cap: the next with room")
        self.assertIsNone(d.send(chat("a"))[1], "all full: the caller waits in line")

    def test_waiters_are_never_jumped(self):
        d = Dispatch(count=1, train=1)
        d.send(chat("a"))

        async def main():
            waiter = d.slots.wait("train")
            d.slots.give_back(d.servers[0], "train")
            self.assertIs(await waiter, d.servers[0])
            d.slots.give_back(d.servers[0], "train")
            second = d.slots.wait("train")
            self.assertIsNone(d.slots.take("train", prefer=d.servers[0]), "a waiter is first in line")
            d.slots.leave(second, "train")

        asyncio.run(main())

    def test_train_and_eval_have_their_own_caps(self):
        d = Dispatch(count=2, train=4, eval=1)
        self.assertIs(d.send(chat("a"), "eval")[1], d.servers[0])
        self.assertIs(d.send(chat("a"), "train")[1], d.servers[0], "train has room on s0")
        self.assertIs(d.send(chat("a"), "eval")[1], d.servers[1], "eval is full on s0")
        self.assertEqual([s.in_flight for s in d.servers], [{"train": 1, "eval": 1}, {"train": 0, "eval": 1}])

    def test_a_server_down_mid_episode_moves_its_conversation(self):
        d = Dispatch(count=3)
        home = d.call(chat("task"), answer_chat("s1"))
        d.slots.set_healthy(home, False)
        moved = d.call(chat("task", "s1", "o1"), answer_chat("s2"))
        self.assertIsNot(moved, home)
        d.slots.set_healthy(home, True)
        self.assertIs(d.call(chat("task", "s1", "o1", "s2", "o2"), answer_chat("s3")), moved,
                      "the conversation stays where it moved, not back")

    def test_avoid_wins_over_prefer(self):
        d = Dispatch(count=2)
        _, home = d.send(chat("a"))
        d.slots.give_back(home, "train")
        _, retry = d.send(chat("a"), avoid=home)
        self.assertIsNot(retry, home, "the server that just failed is not preferred")

    def test_in_flight_total(self):
        d = Dispatch(count=2)
        for _ in range(3):
            d.send(chat("x"))
        self.assertEqual(d.slots.in_flight_totals["train"], 3)
        d.slots.give_back(d.servers[0], "train")
        self.assertEqual(d.slots.in_flight_totals["train"], 2)


class Knob(unittest.TestCase):
    def test_routing_argument_and_environment(self):
        urls = ["http://127.0.0.1:9/v1"]
        template = a.APIServerConfig(base_url=urls[0])
        self.assertEqual(a.ServerManager([template]).routing, "prefix")
        self.assertIsNone(a.ServerManager([template], routing="round_robin").router)
        with mock.patch.dict(os.environ, {"ATROPOS_SLURM_ROUTING": "round_robin"}):
            self.assertEqual(a.ServerManager([template]).routing, "round_robin")
            self.assertEqual(a.ServerManager([template], routing="prefix").routing, "prefix", "the argument wins")
        cases = [
            ({"routing": "sticky"}, "routing='sticky' must be one of 'prefix', 'round_robin'"),
            ({"routing_epsilon": -1}, "routing_epsilon=-1 must be at least 0"),
            ({"server_load_interval": "x"}, "server_load_interval='x' is not a finite number"),
            ({"server_load_interval": 1, "routing": "round_robin"},
             "server_load_interval=1 needs routing='prefix' (routing='round_robin' reads no load)"),
        ]
        for kwargs, message in cases:
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(a.ConfigError) as caught:
                    a.ServerManager([template], **kwargs)
                self.assertEqual(str(caught.exception), message)
        with mock.patch.dict(os.environ, {"ATROPOS_SLURM_ROUTING": "prefix-cache"}):
            with self.assertRaisesRegex(a.ConfigError, "^ATROPOS_SLURM_ROUTING='prefix-cache' must be one of"):
                a.ServerManager([template])


VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
"""


class ServerLoad(unittest.TestCase):
    def test_parse(self):
        cases = [
            ("/metrics", VLLM_METRICS, 9),
            ("/metrics", b"# nothing of vLLM\nprocess_cpu_seconds_total 1.0\n", None),
            ("/metrics", b"vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n", 0),
            # SGLang's num_reqs is running + waiting already (num_waiting_reqs was added twice)
            ("/get_load", b'{"num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 900}', 5),
            ("/get_load", b'[{"dp_rank": 0, "num_reqs": 4, "num_waiting_reqs": 4, "num_tokens": 10, '
                          b'"num_pending_tokens": 0, "ts_tic": 1.5}]', 4),
            ("/get_load", b'[{"dp_rank": 0, "num_reqs": 1, "num_waiting_reqs": 0}, {"dp_rank": 1, "num_reqs": 2}]', 3),
            ("/get_load", b'{"load": 3}', None),
            ("/get_load", b"not json", None),
            ("/get_load", b'{"num_reqs": "5"}', None),
            # hostile or broken: no number, never an exception
            ("/metrics", b"vllm:num_requests_running 1e400\n", None),
            ("/metrics", b"vllm:num_requests_running 1.2.3\n", None),
            ("/metrics", b"vllm:num_requests_running -5\n", None),
            ("/metrics", b"vllm:num_requests_running 5e9\n", None),
            ("/get_load", b'{"num_reqs": 1, "num_waiting_reqs": "2"}', None),
            ("/get_load", b'{"num_reqs": true}', None),
            ("/get_load", b'{"num_reqs": -3}', None),
            ("/get_load", b'{"num_reqs": NaN}', None),
            ("/get_load", b"[" * 100000 + b"]" * 100000, None),
            ("/get_load", b'\xff\xfe', None),
        ]
        for path, body, load in cases:
            with self.subTest(path=path, body=body):
                self.assertEqual(a.parse_server_load(path, body), load)

    def test_read_from_a_server_and_the_fallback_path(self):
        async def main():
            seen = []

            async def serve(reader, writer):
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                seen.append(path)
                status, body = (b"404 Not Found", b"{}") if path == "/metrics" else \
                    (b"200 OK", b'{"num_reqs": 7, "num_waiting_reqs": 1}')
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
                writer.close()

            listener = await asyncio.start_server(serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
            paths = ["/metrics", "/get_load"]
            first = await a.read_server_load(url, paths, 5)
            second = await a.read_server_load(url, paths, 5)
            listener.close()
            return first, second, paths, seen

        first, second, paths, seen = asyncio.run(asyncio.wait_for(main(), LIMIT))
        self.assertEqual((first, second), (7, 7))
        self.assertEqual(paths, ["/get_load"], "a 404 path is not asked again")
        self.assertEqual(seen, ["/metrics", "/get_load", "/get_load"])

    def test_the_manager_reads_the_loads(self):
        async def main():
            async def serve(reader, writer):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(VLLM_METRICS)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + VLLM_METRICS)
                await writer.drain()
                writer.close()

            listener = await asyncio.start_server(serve, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
            manager = make_manager([url, url], routing="prefix", server_load_interval=0.05)
            off = make_manager([url], routing="prefix")
            manager._enter()  # the first call starts the reader in its loop
            off._enter()
            while len(manager.router.reported) < 2:
                await asyncio.sleep(0.01)
            reported = dict(manager.router.reported), manager.router.reported_total
            await manager.close()
            await off.close()
            listener.close()
            return reported, -1 in off._probes

        (reported, total), off_reads = asyncio.run(asyncio.wait_for(main(), LIMIT))
        self.assertEqual(sorted(reported.values()), [9, 9])
        self.assertEqual(total, 18)
        self.assertFalse(off_reads, "off by default")


class ThroughTheManager(unittest.TestCase):
    """Multi-turn conversations through ``ServerManager`` over stub servers: each stays on one."""

    def setUp(self):
        mute_logs(self)

    def test_conversations_stick_and_spread(self):
        with LoopThread() as thread:
            stubs = [a.StubServer() for _ in range(3)]
            for stub in stubs:
                thread.run(stub.start())
            try:
                manager = make_manager([f"http://127.0.0.1:{s.port}/v1" for s in stubs], routing="prefix")

                async def episode(i):
                    messages, ports = [SYSTEM, {"role": "user", "content": f"task {i}"}], set()
                    for turn in range(4):
                        resp = await manager.chat_completion(messages=messages, max_tokens=4)
                        ports.add(resp.system_fingerprint)
                        messages = messages + [dict(resp.choices[0].message), {"role": "user", "content": f"o{turn}"}]
                    return ports

                async def main():
                    try:
                        return await asyncio.gather(*(episode(i) for i in range(6)))
                    finally:
                        await manager.close()

                homes = asyncio.run(asyncio.wait_for(main(), LIMIT))
            finally:
                for stub in stubs:
                    thread.run(stub.stop())
        self.assertEqual([len(h) for h in homes], [1] * 6, "every turn of an episode on one server")
        self.assertEqual([s.completed for s in stubs], [8, 8, 8], "two episodes per server")

    def test_content_that_json_cannot_sort_is_sent_all_the_same(self):
        # The routing key's json.dumps(sort_keys=True) raised TypeError on an object whose keys
        # mix types, before the request was sent; round-robin (and the body's own JSON) sent it.
        with LoopThread() as thread:
            stub = a.StubServer()
            thread.run(stub.start())
            try:
                manager = make_manager([f"http://127.0.0.1:{stub.port}/v1"], routing="prefix")

                async def main():
                    try:
                        messages = [{"role": "user", "content": {1: "one", "a": "b"}}]
                        first = await manager.chat_completion(messages=messages, max_tokens=4)
                        again = messages + [dict(first.choices[0].message), {"role": "user", "content": [{2: 3, "x": 4}]}]
                        return [first, await manager.chat_completion(messages=again, max_tokens=4)]
                    finally:
                        await manager.close()

                answers = asyncio.run(asyncio.wait_for(main(), LIMIT))
            finally:
                thread.run(stub.stop())
        self.assertEqual([len(r.choices) for r in answers], [1, 1])
        self.assertEqual(stub.completed, 2)


if __name__ == "__main__":
    unittest.main()
