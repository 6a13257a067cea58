"""Tests of the HTTP client, ``OpenAIServer``, ``ServerManager`` and the stub server.

Real loopback servers show the behaviour wherever one can: the module's ``StubServer`` in
process, or ``python -m atropos_slurm stub-server`` as a subprocess when the test must count
the client's own sockets or run user code under its own ``asyncio.run``.  ``FakeServer`` below,
a raw asyncio socket server, is used only for faults no real server produces on demand: stalls,
resets, garbage bytes, oversize heads and bodies, storms of errors with ``Retry-After``.

Every test is bounded (``LIMIT`` seconds per async test, timeouts on every subprocess) and
asserts behaviour, never speed.

Run: ``python -m pytest tests/test_dispatch.py -q`` or ``python -m unittest tests.test_dispatch``.
"""

import asyncio
import email.utils
import gc
import json
import os
import select
import socket
import subprocess
import sys
import time
import tracemalloc
import unittest
import warnings
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import atropos_slurm as a  # noqa: E402
from atropos_slurm import APIServerConfig, ServerBaseline, ServerManager  # noqa: E402  (Atropos' imports)
from support import (  # noqa: E402
    LIMIT, AsyncCase, LoopThread, after, answer, chat_payload, close_at_once, closed_port, drop_second_on_each_connection,
    endless_chunked, endless_until_eof, fake, garbage, http_response, huge_length, make_manager,
    module_env, mute_logs, open_fds, oversize_head, peak_memory, raw, reserve_ports, reset_mid_body,
    run_module, server_for, spawn_stub_server, sse_reply, sse_then_reset, sse_then_stall, stall,
    start_stubs, stop_process, stub_url, too_many_headers, until,
)

MESSAGES = [{"role": "user", "content": "hi"}]


# =============================================================================================
# Pure protocol functions
# =============================================================================================


class ParseResponseHead(unittest.TestCase):
    def test_status_line_and_headers(self):
        head = a.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: application/json\r\n"
                                     b"Set-Cookie: a=1\r\nset-cookie: b=2")
        self.assertEqual((head.status, head.reason, head.content_length, head.chunked, head.keep_alive),
                         (200, "OK", 12, False, True))
        self.assertEqual(head.headers["content-type"], "application/json")
        self.assertEqual(head.headers["set-cookie"], "a=1, b=2")
        self.assertEqual(a.parse_response_head(b"HTTP/1.1 404").reason, "")

    def test_keep_alive_rules(self):
        parse = a.parse_response_head
        self.assertFalse(parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0").keep_alive)
        self.assertFalse(parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0").keep_alive)
        self.assertTrue(parse(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0").keep_alive)
        self.assertFalse(parse(b"HTTP/1.1 200 OK").keep_alive, "a body delimited by EOF ends the connection")
        chunked = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5")
        self.assertEqual((chunked.chunked, chunked.content_length, chunked.keep_alive), (True, None, True))
        self.assertFalse(parse(b"HTTP/1.1 204 No Content").has_body)
        self.assertFalse(parse(b"HTTP/1.1 304 Not Modified").has_body)

    def test_invalid_heads_are_protocol_errors(self):
        for block in (b"", b"SSH-2.0-OpenSSH", b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"http/1.1 200 OK",
                      b"HTTP/1.1 200 OK\r\nNo colon here", b"HTTP/1.1 200 OK\r\nBad Name: x",
                      b"HTTP/1.1 200 OK\r\n folded: x", b"HTTP/1.1 200 OK\r\n: empty name",
                      b"HTTP/1.1 200 OK\r\nContent-Length: -1", b"HTTP/1.1 200 OK\r\nContent-Length: 1e3",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1"):
            with self.subTest(block=block), self.assertRaises(a.ProtocolError):
                a.parse_response_head(block)

    def test_a_status_outside_100_599_is_a_protocol_error(self):
        """Issue 10 item 18: three digits are not enough; 000, 099 and 600-999 are no HTTP status."""
        for status in (b"000", b"099", b"600", b"999"):
            with self.subTest(status=status), self.assertRaises(a.ProtocolError):
                a.parse_response_head(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 0")
        for status in (100, 599):
            self.assertEqual(a.parse_response_head(b"HTTP/1.1 %d X\r\nContent-Length: 0" % status).status, status)

    def test_conflicting_content_length(self):
        with self.assertRaisesRegex(a.ProtocolError, "conflicting Content-Length"):
            a.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 11")
        same = a.parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\ncontent-length: 10")
        self.assertEqual(same.content_length, 10)

    def test_header_limits(self):
        many = b"HTTP/1.1 200 OK" + b"".join(b"\r\nX-%d: v" % i for i in range(a.MAX_HEADER_COUNT + 1))
        with self.assertRaisesRegex(a.ProtocolError, "more than 100 response headers"):
            a.parse_response_head(many)
        big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * a.MAX_HEADER_BYTES
        with self.assertRaisesRegex(a.ProtocolError, "larger than"):
            a.parse_response_head(big)
        a.parse_response_head(b"HTTP/1.1 200 OK" + b"".join(b"\r\nX-%d: v" % i for i in range(a.MAX_HEADER_COUNT)))


class ChunkSizeAndRetryAfter(unittest.TestCase):
    def test_parse_chunk_size(self):
        self.assertEqual(a.parse_chunk_size(b"1a\r\n"), 26)
        self.assertEqual(a.parse_chunk_size(b"1A;name=value\r\n"), 26)
        self.assertEqual(a.parse_chunk_size(b"0\r\n"), 0)
        for line in (b"\r\n", b"-1\r\n", b"0x10\r\n", b"g\r\n", b"1" * 16 + b"\r\n", b" ;x\r\n"):
            with self.subTest(line=line), self.assertRaises(a.ProtocolError):
                a.parse_chunk_size(line)

    def test_parse_retry_after(self):
        self.assertEqual(a.parse_retry_after({}), None)
        self.assertEqual(a.parse_retry_after({"retry-after": "3"}), 3.0)
        self.assertEqual(a.parse_retry_after({"retry-after": "1.5"}), 1.5)
        self.assertEqual(a.parse_retry_after({"retry-after": "-4"}), 0.0)
        self.assertEqual(a.parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}), 0.25)
        self.assertEqual(a.parse_retry_after({"retry-after-ms": "soon", "retry-after": "9"}), 9.0)
        self.assertEqual(a.parse_retry_after({"retry-after": "whenever"}), None)
        future = email.utils.formatdate(time.time() + 30, usegmt=True)
        self.assertTrue(25 <= a.parse_retry_after({"retry-after": future}) <= 31)
        past = email.utils.formatdate(time.time() - 3600, usegmt=True)
        self.assertEqual(a.parse_retry_after({"retry-after": past}), 0.0)


class SSEParserTest(unittest.TestCase):
    def test_events_lines_and_fields(self):
        parser = a.SSEParser()
        stream = (b": keep-alive comment\n\n"
                  b"data: {\"a\":1}\r\n\r\n"
                  b"event: message\nid: 7\nretry: 10\ndata:no-space\n\n"
                  b"data: line one\ndata: line two\n\n"
                  b"data: [DONE]\n\n")
        self.assertEqual(parser.feed(stream), ['{"a":1}', "no-space", "line one\nline two", "[DONE]"])

    def test_split_across_feeds(self):
        stream = b"data: {\"x\": \"\xc3\xa9\"}\r\n\r\ndata: second\n\n"
        for size in (1, 2, 3, 7):
            parser, events = a.SSEParser(), []
            for i in range(0, len(stream), size):
                events += parser.feed(stream[i:i + size])
            with self.subTest(size=size):
                self.assertEqual(events, ['{"x": "\u00e9"}', "second"])

    def test_unterminated_last_event_and_line_limit(self):
        parser = a.SSEParser()
        self.assertEqual(parser.feed(b"data: tail"), [])
        self.assertEqual(parser.close(), ["tail"])
        self.assertEqual(a.SSEParser().close(), [])
        with self.assertRaisesRegex(a.ProtocolError, "longer than"):
            a.SSEParser().feed(b"data: " + b"x" * (a.MAX_SSE_LINE_BYTES + 1))


    def test_a_long_line_in_single_bytes_costs_what_it_costs_whole(self):
        """Issue 10 item 17: parsing is linear in the line's length.  Counted, not timed: the
        bytes allocated feed by feed (tracemalloc) stay a constant per byte fed (about 340 for
        the small objects of a call), where re-joining the held bytes on every feed allocates
        about length / 2 per byte fed (150,000 here, 45 GB in all)."""
        line = b"data: " + b"x" * (300 * 1024) + b"\n\n"
        whole = a.SSEParser().feed(line)
        parser, events, allocated = a.SSEParser(), [], 0
        tracemalloc.start()
        try:
            for i in range(len(line)):
                piece = line[i:i + 1]
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                events += parser.feed(piece)
                allocated += tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(events, whole)
        self.assertEqual(len(whole[0]), 300 * 1024)
        self.assertLess(allocated / len(line), 2000)

    def test_the_line_limit_holds_for_a_line_in_pieces(self):
        parser = a.SSEParser()
        piece = b"x" * 4096
        for _ in range(a.MAX_SSE_LINE_BYTES // len(piece)):
            self.assertEqual(parser.feed(piece), [])
        with self.assertRaisesRegex(a.ProtocolError, "longer than"):
            parser.feed(b"x")
        parser = a.SSEParser()
        parser.feed(b"data: " + b"y" * 100)
        self.assertEqual(parser.feed(b"\r"), [])
        self.assertEqual(parser.feed(b"\n\r\n"), ["y" * 100])


class ErrorMessage(unittest.TestCase):
    def test_shapes(self):
        cases = [
            (b'{"error": {"message": "model not found", "type": "invalid_request_error"}}', "model not found"),
            (b'{"object": "error", "message": "max_tokens too large", "code": 400}', "max_tokens too large"),
            (b'{"error": "Unauthorized"}', "Unauthorized"),
            (b'{"detail": "Not Found"}', "Not Found"),
            (b'{"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}', "field required"),
            (b"upstream connect error", "upstream connect error"),
            (b"  \n", "(empty body)"),
            (b"[1, 2]", "[1, 2]"),
            (b"\xff\xfe broken utf-8", "\ufffd\ufffd broken utf-8"),
        ]
        for body, expected in cases:
            with self.subTest(body=body):
                self.assertIn(expected, a.error_message(body))
        self.assertEqual(len(a.error_message(b"x" * 10000)), 500)


# =============================================================================================
# The seed's code, unchanged, against stub-server subprocesses
# =============================================================================================


def slurm_env(base, count, nodelist="localhost"):
    return {"SLURM_JOB_NODELIST": nodelist, "NUM_TRAINING_NODES": "0", "ATROPOS_SLURM_GPUS_PER_NODE": str(count),
            "ATROPOS_SLURM_BASE_PORT": str(base), "ATROPOS_SLURM_HOSTLIST": "python",
            "ATROPOS_SLURM_ROUTING": "round_robin"}  # the same prompt again and again: spread it


class SeedStyle(unittest.TestCase):
    def setUp(self):
        mute_logs(self)

    def test_seed_code_unchanged(self):
        proc, base = spawn_stub_server(4)
        self.addCleanup(stop_process, proc)
        with mock.patch.dict(os.environ, slurm_env(base, 4)):
            server_manager = ServerManager(configs=ServerBaseline(timeout=30), slurm=True)  # before asyncio.run

        async def main():
            try:
                chats = [await server_manager.chat_completion(messages=MESSAGES, n=4, max_tokens=16) for _ in range(8)]
                text = await server_manager.completion(prompt="Once upon a time", max_tokens=4)
                return chats, text
            finally:
                await server_manager.close()

        chats, text = asyncio.run(asyncio.wait_for(main(), LIMIT))
        resp = chats[0]
        self.assertTrue(resp.choices[0].message.content.startswith("stub reply from"))
        self.assertEqual([c.index for c in resp.choices], [0, 1, 2, 3])
        self.assertEqual(resp["usage"]["total_tokens"], 8 + 4 * 16)
        self.assertEqual(resp.usage.completion_tokens, 4 * 16)
        self.assertEqual(resp["model"], "default", "model comes from ServerBaseline.model_name")
        self.assertTrue(text.choices[0].text.startswith("stub reply from"))
        self.assertEqual([s.url for s in server_manager.servers], [f"http://localhost:{base + i}/v1" for i in range(4)])
        self.assertEqual(sorted(s.stats.done for s in server_manager.servers), [2, 2, 2, 3])
        ports = {int(r.system_fingerprint.rsplit(":", 1)[1]) for r in chats}
        self.assertEqual(ports, {base + i for i in range(4)}, "round-robin reached every stub process port")

    def test_manager_survives_successive_asyncio_runs(self):
        """Training loops call ``asyncio.run`` once per step: pooled sockets and probes of the
        previous (closed) loop must not break the next run, and a server found down in one run
        is probed back in the next."""
        # The pool cannot close a connection whose event loop is closed: it drops it and the GC
        # closes the socket, with a ResourceWarning whenever a collection happens to run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with LoopThread() as thread:
                stubs = thread.run(self._start_stubs(2))
                manager = make_manager([stub_url(s) for s in stubs])

                async def calls(count):
                    return [await manager.chat_completion(messages=MESSAGES, max_tokens=2) for _ in range(count)]

                self.assertEqual(len(asyncio.run(asyncio.wait_for(calls(4), LIMIT))), 4)
                self.assertEqual(len(asyncio.run(asyncio.wait_for(calls(4), LIMIT))), 4)
                thread.run(stubs[1].stop())
                self.assertEqual(len(asyncio.run(asyncio.wait_for(calls(4), LIMIT))), 4)
                self.assertFalse(manager.slots.records[1].healthy)
                thread.run(stubs[1].start())
                before = stubs[1].completed

                async def until_back():
                    while not manager.slots.records[1].healthy:  # the user's next calls restart the probe
                        await calls(1)
                        await asyncio.sleep(0.02)
                    await calls(4)
                    await manager.close()

                asyncio.run(asyncio.wait_for(until_back(), LIMIT))
                self.assertGreater(stubs[1].completed, before)
                for stub in stubs:
                    thread.run(stub.stop())
            gc.collect()

    @staticmethod
    async def _start_stubs(count):
        return [await a.StubServer().start() for _ in range(count)]


# =============================================================================================
# Dispatch: round-robin, caps, n-splitting
# =============================================================================================


class Dispatch(AsyncCase):
    async def test_round_robin_spread(self):
        stubs = await start_stubs(self, 4)
        manager = make_manager([stub_url(s) for s in stubs])
        self.addAsyncCleanup(manager.close)
        for _ in range(40):
            await manager.chat_completion(messages=MESSAGES, max_tokens=2)
        self.assertEqual([s.completed for s in stubs], [10] * 4)
        # 200 at once fit in the 4 x 64 slots: strict rotation (when slots run out, a freed slot
        # goes to the first waiter, wherever it is).
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES, max_tokens=2) for _ in range(200)))
        self.assertEqual([s.completed for s in stubs], [60] * 4)
        self.assertEqual([row["done"] for row in manager.stats()], [60] * 4)
        self.assertEqual([row["in_flight"] for row in manager.stats()], [0] * 4)

    async def test_train_cap_is_measured_at_the_server(self):
        stubs = await start_stubs(self, 2, latency=0.2)
        manager = make_manager([stub_url(s) for s in stubs], cap=4)
        self.addAsyncCleanup(manager.close)
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(24)))
        self.assertEqual([s.max_in_flight for s in stubs], [4, 4])
        self.assertEqual(sum(s.completed for s in stubs), 24)
        self.assertEqual([sum(s.in_flight.values()) for s in manager.slots.records], [0, 0])
        self.assertEqual([manager.slots.waiting(split) for split in ("train", "eval")], [0, 0])

    async def test_eval_split_has_its_own_cap(self):
        stubs = await start_stubs(self, 1, latency=0.2)
        manager = make_manager([stub_url(stubs[0])], cap=5, eval_cap=2)
        self.addAsyncCleanup(manager.close)
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES, split="eval") for _ in range(6)))
        self.assertEqual(stubs[0].max_in_flight, 2, "split='eval' uses num_requests_for_eval")
        stubs[0].max_in_flight = 0
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(10)))
        self.assertEqual(stubs[0].max_in_flight, 5, "split='train' uses num_max_requests_at_once")
        stubs[0].max_in_flight = 0
        eval_full = asyncio.gather(*(manager.chat_completion(messages=MESSAGES, split="eval") for _ in range(4)))
        train = asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(10)))
        await asyncio.gather(eval_full, train)
        self.assertEqual(stubs[0].max_in_flight, 7, "eval traffic does not take training slots")
        self.assertEqual(manager.slots.records[0].in_flight, {"train": 0, "eval": 0})
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES, split=s) for s in ("validation", "test")))
        self.assertEqual(manager.servers[0].stats.split_counts["eval"][0], 6 + 4 + 2, "any split but 'train' is eval (Atropos)")

    async def test_n_is_split_over_requests_and_merged(self):
        stubs = await start_stubs(self, 2)
        manager = make_manager([stub_url(s) for s in stubs], max_n_completions=3)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES, n=8, max_tokens=5)
        self.assertEqual(sum(s.received for s in stubs), 3, "n=8 with 3 per request: 3 + 3 + 2")
        self.assertEqual([c.index for c in resp.choices], list(range(8)))
        self.assertTrue(all(c.message.content.startswith("stub reply") for c in resp.choices))
        self.assertEqual(dict(resp.usage), {"prompt_tokens": 3 * 8, "completion_tokens": 8 * 5,
                                            "total_tokens": 3 * 8 + 8 * 5})
        self.assertEqual(len(json.loads(resp.raw)), 3)
        small = await manager.completion(prompt="p", n=3, max_tokens=1)
        self.assertEqual(sum(s.received for s in stubs), 4, "n <= max_n_completions is one request")
        self.assertEqual([c.index for c in small.choices], [0, 1, 2])

    async def test_n_kwarg_is_ignored_sends_n_requests(self):
        stubs = await start_stubs(self, 1)
        template = APIServerConfig(base_url=stub_url(stubs[0]), n_kwarg_is_ignored=True, timeout=20)
        manager = ServerManager([template])
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES, n=3, max_tokens=2)
        self.assertEqual(stubs[0].received, 3)
        self.assertEqual([c.index for c in resp.choices], [0, 1, 2])
        self.assertEqual(resp.usage.completion_tokens, 3 * 2)


# =============================================================================================
# Failover: dead, stalled and broken servers; all down
# =============================================================================================


class Failover(AsyncCase):
    async def test_server_killed_mid_run_then_restarted_on_the_same_port(self):
        stubs = await start_stubs(self, 3, latency=0.005)
        manager = make_manager([stub_url(s) for s in stubs], cap=8)
        self.addAsyncCleanup(manager.close)
        done = 0

        async def one():
            nonlocal done
            resp = await manager.chat_completion(messages=MESSAGES, max_tokens=2)
            done += 1
            if done == 100:
                await stubs[1].stop()
            return resp

        results = await asyncio.gather(*(one() for _ in range(300)))
        self.assertEqual(len(results), 300, "every request succeeded on the others")
        self.assertEqual(sum(s.stats.done for s in manager.servers), 300)
        victim = manager.slots.records[1]
        self.assertFalse(victim.healthy)
        self.assertIn(stub_url(stubs[1]), victim.last_error)
        self.assertIn(f"{stub_url(stubs[1])} down", repr(manager))
        self.assertGreaterEqual(sum(s.completed for s in stubs), 300, "a crash may lose answers, never requests")
        before = stubs[1].completed
        await stubs[1].start()
        await until(lambda: victim.healthy, what="the restarted server to be probed back")
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(30)))
        self.assertGreaterEqual(stubs[1].completed - before, 5, "traffic returned to the restarted server")

    async def test_crash_with_idle_pooled_connections_loses_nothing(self):
        # Idle pooled connections to a server that then dies all fail before any byte: the
        # resend must use a fresh connection (refused: the server is down) and then move on,
        # not burn its attempts on the dead server's other idle connections.
        lost = 0
        for _ in range(10):
            stubs = await start_stubs(self, 2)
            stubs[1].die_after = 8
            manager = make_manager([stub_url(s) for s in stubs], retry_backoff=0.01)
            await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(16)))
            results = await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(8)),
                                           return_exceptions=True)
            lost += sum(isinstance(r, BaseException) for r in results)
            await manager.close()
            for stub in stubs:
                await stub.stop()
        self.assertEqual(lost, 0)

    async def test_die_after(self):
        stubs = await start_stubs(self, 3, latency=0.002)
        stubs[0].die_after = 10
        manager = make_manager([stub_url(s) for s in stubs], cap=4)
        self.addAsyncCleanup(manager.close)
        results = await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(120)))
        self.assertEqual(len(results), 120)
        self.assertTrue(stubs[0].died.is_set())
        self.assertFalse(manager.slots.records[0].healthy)
        self.assertGreater(manager.servers[0].stats.failed, 0)
        self.assertEqual(sum(s.stats.done for s in manager.servers), 120)
        self.assertGreaterEqual(sum(s.completed for s in stubs), 120)

    async def test_all_down_raises_no_healthy_server_error_listing_each(self):
        urls = [f"http://127.0.0.1:{closed_port()}/v1" for _ in range(3)]
        manager = make_manager(urls, no_server_timeout=0.5)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.ServerError):  # three attempts, one per server, each refused
            await asyncio.wait_for(manager.chat_completion(messages=MESSAGES), 0.5 + 10)
        self.assertFalse(any(s.healthy for s in manager.slots.records))
        for _ in range(2):
            with self.assertRaises(a.NoHealthyServerError) as caught:
                await asyncio.wait_for(manager.chat_completion(messages=MESSAGES), 0.5 + 10)
            message = str(caught.exception)
            for url in urls:
                self.assertIn(url, message)
            self.assertEqual(message.count("cannot connect"), 3, message)
        self.assertEqual([s.in_flight for s in manager.slots.records], [{"train": 0, "eval": 0}] * 3)
        self.assertEqual([manager.slots.waiting(split) for split in ("train", "eval")], [0, 0])

    async def test_all_stalled_never_hangs(self):
        stalled = [await fake(self, stall) for _ in range(2)]
        for server in stalled:
            server.health_status = 503
        manager = make_manager([s.url for s in stalled], timeout=0.3, no_server_timeout=0.5)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.NoHealthyServerError) as caught:
            await asyncio.wait_for(manager.chat_completion(messages=MESSAGES), 15)
        for server in stalled:
            self.assertIn(server.url, str(caught.exception))

    async def test_stalled_server_times_out_and_request_moves_on(self):
        stalled = await fake(self, stall, health_status=503)
        stubs = await start_stubs(self, 1)
        direct = server_for(stalled.url, timeout=0.3)
        self.addCleanup(direct.close)
        with self.assertRaisesRegex(a.ServerTimeoutError, "timeout=0.3"):
            await asyncio.wait_for(direct.chat_completion(messages=MESSAGES), 10)
        configs = [APIServerConfig(base_url=stalled.url, timeout=0.3), APIServerConfig(base_url=stub_url(stubs[0]))]
        manager = ServerManager(configs, retry_backoff=0.01, health_probe_interval=0.05)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES)
        self.assertTrue(resp.choices[0].message.content.startswith("stub reply"))
        self.assertFalse(manager.slots.records[0].healthy)
        self.assertEqual(stubs[0].completed, 1)

    async def test_reset_mid_body(self):
        broken = await fake(self, reset_mid_body)
        stubs = await start_stubs(self, 1)
        direct = server_for(broken.url)
        self.addCleanup(direct.close)
        with self.assertRaisesRegex(a.ServerConnectionError, "response body"):
            await direct.chat_completion(messages=MESSAGES)
        manager = make_manager([broken.url, stub_url(stubs[0])])
        self.addAsyncCleanup(manager.close)
        for _ in range(4):
            await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(stubs[0].completed, 4)
        self.assertGreaterEqual(manager.servers[0].stats.failed, 1)


# =============================================================================================
# Retries: bounded, honouring Retry-After, never for client errors
# =============================================================================================


class Retries(AsyncCase):
    async def test_500_storm_makes_at_most_max_retries_plus_one_requests(self):
        server = await fake(self, answer(500, {"error": {"message": "engine exploded"}}))
        for retries in (0, 1, 3):
            server.posts.clear()
            manager = make_manager([server.url], max_retries=retries)
            self.addAsyncCleanup(manager.close)
            with self.assertRaises(a.APIStatusError) as caught:
                await manager.chat_completion(messages=MESSAGES)
            self.assertEqual(len(server.posts), retries + 1)
            self.assertEqual(caught.exception.status, 500)
            self.assertIn("engine exploded", str(caught.exception))
            if retries:
                self.assertIn(f"attempt {retries + 1} of at most {retries + 1}", str(caught.exception))

    async def test_every_kind_of_failure_is_bounded(self):
        """Whatever fails, one call makes at most max_retries + 1 HTTP requests, counted at the
        server, even when a pooled keep-alive connection is reused for the first attempt."""
        ok = answer(200)
        kinds = {
            "503": answer(503, b"Service Unavailable"),
            "429": answer(429, {"error": {"message": "slow down"}}),
            "408": answer(408, {"detail": "timeout"}),
            "reset mid body": reset_mid_body,
            "closed without answer": close_at_once,
            "garbage": garbage,
            "stall": stall,
        }
        for name, failure in kinds.items():
            with self.subTest(kind=name):
                server = await fake(self, after(1, ok, failure))
                manager = make_manager([server.url], timeout=0.5 if failure is stall else 20, max_retries=2)
                self.addAsyncCleanup(manager.close)
                await manager.chat_completion(messages=MESSAGES)  # leaves a pooled connection
                with self.assertRaises(a.ServerError):
                    await manager.chat_completion(messages=MESSAGES)
                if failure is stall:
                    await asyncio.sleep(0.2)  # a timed-out request may still be unread: count it too
                sent = len(server.posts) - 1
                self.assertLessEqual(sent, 3, f"{name}: HTTP requests for the failing call")
                if failure is not stall:  # a loaded machine may time out an attempt before it is sent
                    self.assertEqual(sent, 3, f"{name}: HTTP requests for the failing call")
                self.assertEqual(manager.slots.records[0].in_flight, {"train": 0, "eval": 0})

    async def test_stale_pooled_connection_is_resent_to_the_same_server(self):
        server = await fake(self, drop_second_on_each_connection)
        stubs = await start_stubs(self, 1)
        manager = make_manager([server.url, stub_url(stubs[0])], max_retries=1)
        self.addAsyncCleanup(manager.close)
        pool = manager.servers[0]._pool
        await manager.chat_completion(messages=MESSAGES)  # to the fake: its connection is pooled
        await manager.chat_completion(messages=MESSAGES)  # to the stub
        resp = await manager.chat_completion(messages=MESSAGES)  # the fake drops it, then answers afresh
        self.assertEqual(resp.choices[0].message.content, "fake reply")
        self.assertEqual((len(server.posts), pool.opened, stubs[0].received), (3, 2, 1))
        self.assertTrue(manager.slots.records[0].healthy, "a connection closed while idle is no sign of death")
        strict = make_manager([server.url], max_retries=0)
        self.addAsyncCleanup(strict.close)
        await strict.chat_completion(messages=MESSAGES)
        with self.assertRaises(a.StaleConnectionError):  # max_retries=0 means one HTTP request, no resend
            await strict.chat_completion(messages=MESSAGES)
        self.assertEqual(len(server.posts), 5)

    async def test_aborted_generation_is_retried_not_returned(self):
        aborted = chat_payload(2)
        aborted["choices"][1]["finish_reason"] = "abort"  # vLLM: /abort_requests, /pause, shutdown
        server = await fake(self, after(1, answer(200, aborted), answer(200, chat_payload(2))))
        manager = make_manager([server.url], max_retries=1, retry_backoff=0.01)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES, n=2)
        self.assertEqual([c.finish_reason for c in resp.choices], ["stop", "stop"])
        self.assertEqual(len(server.posts), 2)
        self.assertTrue(manager.slots.records[0].healthy, "an abort (e.g. a paused server) is no sign of death")
        always = await fake(self, answer(200, aborted))
        strict = make_manager([always.url], max_retries=0)
        self.addAsyncCleanup(strict.close)
        with self.assertRaisesRegex(a.GenerationAbortedError, "aborted choice 1"):
            await strict.chat_completion(messages=MESSAGES)

    async def test_idle_connections_are_dropped_before_the_server_would(self):
        stubs = await start_stubs(self, 1, keep_alive_timeout=60)
        manager = make_manager([stub_url(stubs[0])], max_retries=0)
        self.addAsyncCleanup(manager.close)
        pool = manager.servers[0]._pool
        await manager.chat_completion(messages=MESSAGES)
        await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(pool.opened, 1)
        pool._idle[-1].idle_since -= a.POOL_IDLE_SECONDS + 1  # as if it had idled that long
        await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(pool.opened, 2, "an old idle connection is not risked")

    async def test_429_storm_honours_retry_after(self):
        server = await fake(self, answer(429, {"error": {"message": "rate limited"}}, [("Retry-After", "1")]))
        manager = make_manager([server.url], max_retries=1)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.APIStatusError) as caught:
            await manager.chat_completion(messages=MESSAGES)
        self.assertEqual((caught.exception.status, caught.exception.retry_after), (429, 1.0))
        self.assertIn("rate limited", str(caught.exception))
        self.assertEqual(len(server.posts), 2)
        self.assertGreaterEqual(server.posts[1].time - server.posts[0].time, 0.9, "Retry-After: 1 was honoured")
        self.assertTrue(manager.slots.records[0].healthy, "429 is back-pressure, not a dead server")

    async def test_retry_after_ms_then_success(self):
        failing = answer(503, {"error": {"message": "warming up"}}, [("retry-after-ms", "300")])
        server = await fake(self, after(2, failing, answer(200)))
        manager = make_manager([server.url], max_retries=2)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(resp.choices[0].message.content, "fake reply")
        times = [p.time for p in server.posts]
        self.assertEqual(len(times), 3)
        self.assertGreaterEqual(min(times[1] - times[0], times[2] - times[1]), 0.25)

    async def test_retry_after_beyond_the_limit_is_not_waited_for(self):
        server = await fake(self, answer(429, {"error": "busy"}, [("Retry-After", "3600")]))
        manager = make_manager([server.url], max_retries=5)
        self.addAsyncCleanup(manager.close)
        with self.assertRaisesRegex(a.APIStatusError, "busy"):
            await asyncio.wait_for(manager.chat_completion(messages=MESSAGES), 10)
        self.assertEqual(len(server.posts), 1)

    async def test_client_errors_are_not_retried(self):
        cases = [
            (400, {"error": {"message": "This model's maximum context length is 2048 tokens"}}, "maximum context"),
            (401, {"error": "Unauthorized"}, "Unauthorized"),
            (404, {"detail": "Not Found"}, "Not Found"),
            (422, {"detail": [{"msg": "field required"}]}, "field required"),
            (413, b"request too large", "request too large"),
        ]
        for status, payload, words in cases:
            with self.subTest(status=status):
                server = await fake(self, answer(status, payload))
                manager = make_manager([server.url], max_retries=3)
                self.addAsyncCleanup(manager.close)
                with self.assertRaises(a.APIStatusError) as caught:
                    await manager.chat_completion(messages=MESSAGES)
                self.assertEqual(caught.exception.status, status)
                self.assertIn(words, str(caught.exception))
                self.assertIn(words, caught.exception.message)
                self.assertIn(server.url, str(caught.exception))
                self.assertEqual(len(server.posts), 1)
                self.assertTrue(manager.slots.records[0].healthy)

    async def test_failures_move_to_a_healthy_server(self):
        failing = await fake(self, answer(500, {"error": {"message": "boom"}}), health_status=503)
        stubs = await start_stubs(self, 2)
        manager = make_manager([failing.url] + [stub_url(s) for s in stubs])
        self.addAsyncCleanup(manager.close)
        for _ in range(20):
            await manager.chat_completion(messages=MESSAGES)
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(40)))
        self.assertEqual(len(failing.posts), 1, "down after its first 500; its probe keeps failing")
        self.assertEqual(sum(s.completed for s in stubs), 60)
        await until(lambda: "health probe: HTTP 503" in manager.slots.records[0].last_error, what="a failed probe")
        self.assertFalse(manager.slots.records[0].healthy)


# =============================================================================================
# Broken HTTP: garbage, oversize heads and bodies, keep-alive
# =============================================================================================


class RetryBudgetStorm(AsyncCase):
    """The manager's ``RetryBudget`` against real loopback servers, on a simulated clock: a
    storm of 429/503 costs at most 1.2x the calls plus 10 retries per second of storm."""

    def storm_servers(self):
        self.storming, self.fail_next = True, 0
        statuses = iter([429, 503] * 10_000)

        async def handler(fake, request, writer):
            if self.storming or self.fail_next:
                self.fail_next = max(0, self.fail_next - 1)
                writer.write(http_response(next(statuses), {"error": {"message": "storm"}}, [("Retry-After", "0")]))
            else:
                writer.write(http_response(200, chat_payload(int(request.json().get("n", 1)))))
            return True
        return handler

    async def test_a_30_s_storm_is_bounded_by_the_budget_and_retries_flow_after_it(self):
        handler = self.storm_servers()
        servers = [await fake(self, handler) for _ in range(3)]
        manager = make_manager([s.url for s in servers], max_retries=3, retry_backoff=0)
        self.addAsyncCleanup(manager.close)
        manager._mark_down = lambda slot: None  # 503 everywhere would leave no server up: the budget is under test
        clock = [0.0]
        manager.retry_policy.budget.clock = lambda: clock[0]
        calls = 0
        for second in range(30):
            clock[0] = second + 0.5
            outcomes = await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(40)),
                                            return_exceptions=True)
            self.assertTrue(all(isinstance(o, a.APIStatusError) for o in outcomes), outcomes[:1])
            calls += len(outcomes)
        requests = sum(len(s.posts) for s in servers)
        self.assertLessEqual(requests, 1.2 * calls + 10 * 30)
        self.assertGreater(requests, calls, "the reserve let some calls retry")
        self.storming, self.fail_next = False, 1  # the storm is over: one more failure
        clock[0] = 45.0  # the storm's withdrawals are forgotten
        self.assertEqual(len((await manager.chat_completion(messages=MESSAGES)).choices), 1,
                         "after the storm a failed attempt is retried again")
        self.assertEqual(sum(len(s.posts) for s in servers), requests + 2)

    async def test_a_split_call_makes_at_most_its_parts_plus_max_retries_requests(self):
        handler = self.storm_servers()
        servers = [await fake(self, handler) for _ in range(2)]
        manager = make_manager([s.url for s in servers], max_retries=2, retry_backoff=0, max_n_completions=8)
        self.addAsyncCleanup(manager.close)
        manager._mark_down = lambda slot: None
        with self.assertRaises(a.APIStatusError):
            await manager.chat_completion(messages=MESSAGES, n=64)
        self.assertLessEqual(sum(len(s.posts) for s in servers), 8 + 2)
        self.storming = False
        for s in servers:
            s.posts.clear()
        self.assertEqual(len((await manager.chat_completion(messages=MESSAGES, n=64)).choices), 64)
        self.assertEqual(sum(len(s.posts) for s in servers), 8)


class DispatchInvariants(AsyncCase):
    """What the dispatcher promises beyond answering: caught by breaking it on purpose."""

    async def test_a_waiter_is_woken_by_the_release_not_by_polling(self):
        release = asyncio.Event()

        async def held(fake, request, writer):
            await release.wait()
            writer.write(http_response(200, chat_payload()))
            return True
        server = await fake(self, held)
        manager = make_manager([server.url], cap=1)
        self.addAsyncCleanup(manager.close)
        first = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await until(lambda: len(server.posts) == 1, what="the first call at the server")
        second = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        timers = []  # every timer made while the second call waits: a poller makes one per look
        call_at = loop.call_at

        def counted(when, *args, **kwargs):
            timers.append(when - loop.time())
            return call_at(when, *args, **kwargs)
        with mock.patch.object(loop, "call_at", counted):  # call_later (asyncio.sleep) goes through it
            await asyncio.sleep(0.5)
        self.assertFalse(second.done())
        self.assertEqual(len(timers), 1, f"only this test's own sleep made a timer, nothing polls: {timers}")
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        self.assertEqual(len(server.posts), 2)

    async def test_a_retry_never_lands_on_the_server_that_just_failed_while_another_is_free(self):
        bad = await fake(self, answer(429, {"error": {"message": "busy"}}, [("Retry-After", "0")]))
        good = [await fake(self, answer(200)) for _ in range(2)]
        manager = make_manager([bad.url, good[0].url, good[1].url], cap=4, max_retries=1, retry_backoff=0)
        self.addAsyncCleanup(manager.close)
        for _ in range(10):  # 3 at once: when the 429 comes back, the line starts with its server again
            await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(3)))
        self.assertGreaterEqual(len(bad.posts), 10, "it keeps its round-robin turns (429 is no sign of death)")
        self.assertEqual(sum(len(g.posts) for g in good), 30, "each call answered once, its retry elsewhere")

    async def test_a_stale_pooled_connection_drops_its_idle_siblings(self):
        server = await fake(self, drop_second_on_each_connection)
        manager = make_manager([server.url], max_retries=1)
        self.addAsyncCleanup(manager.close)
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(3)))
        pool = manager.servers[0]._pool
        self.assertEqual((server.accepted, pool.idle_count), (3, 3))
        await manager.chat_completion(messages=MESSAGES)  # a pooled one, closed unanswered: resent fresh
        self.assertEqual(server.accepted, 4)
        self.assertEqual(pool.idle_count, 1, "its idle siblings went with it: only the fresh connection idles")

    async def test_no_server_timeout_counts_from_the_first_moment_none_was_healthy(self):
        """Waking up (to look at the servers again) does not restart the wait."""
        server = await fake(self, answer(503, b"down"), health_status=503)
        manager = make_manager([server.url], max_retries=0, no_server_timeout=1.0, health_probe_interval=10)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.APIStatusError):
            await manager.chat_completion(messages=MESSAGES)  # marks it down
        call = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))

        async def wake():
            while not call.done():  # every waiter looks at the servers again, finds none healthy
                await asyncio.sleep(0.2)
                manager.slots.wake_all()
        flapper = asyncio.ensure_future(wake())
        self.addCleanup(flapper.cancel)
        with self.assertRaises(a.NoHealthyServerError):  # renewed per wake-up, it would never end
            await asyncio.wait_for(call, 10)


class BrokenHTTP(AsyncCase):
    async def test_valid_http_variants(self):
        body = json.dumps(chat_payload()).encode()
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
                   + b"0\r\nX-Trailer: yes\r\n\r\n")
        variants = {
            "100 Continue first": (b"HTTP/1.1 100 Continue\r\n\r\n" + http_response(200, chat_payload()), True, 1),
            "chunked, extensions, trailers": (chunked, True, 1),
            "HTTP/1.0, body until EOF": (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body, False, 3),
            "Connection: close": (http_response(200, chat_payload(), [("Connection", "close")]), True, 3),
        }
        for name, (data, keep, opened) in variants.items():
            with self.subTest(variant=name):
                server = await fake(self, raw(data, keep))
                direct = server_for(server.url)
                self.addCleanup(direct.close)
                for _ in range(3):
                    resp = await direct.chat_completion(messages=MESSAGES)
                    self.assertEqual(resp.choices[0].message.content, "fake reply")
                self.assertEqual(direct._pool.opened, opened, "reused only when the response allows it")

    async def test_broken_framing(self):
        cases = {
            "chunk without CRLF": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
                                   a.ProtocolError, "not terminated"),
            "bad chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                               a.ProtocolError, "invalid chunk size"),
            "truncated body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", a.ServerConnectionError,
                               "middle of the response body"),
            "truncated head": (b"HTTP/1.1 200 OK\r\nContent-Le", a.ServerConnectionError, "in the response head"),
            "nothing": (b"", a.ServerConnectionError, "before any response byte"),
        }
        for name, (data, error, words) in cases.items():
            with self.subTest(case=name):
                server = await fake(self, raw(data, keep=False))
                direct = server_for(server.url)
                self.addCleanup(direct.close)
                with self.assertRaisesRegex(error, words) as caught:
                    await direct.chat_completion(messages=MESSAGES)
                self.assertEqual(str(caught.exception).count(server.url), 1, str(caught.exception))

    async def test_probe_falls_back_to_models_when_health_is_missing(self):
        server = await fake(self, after(1, answer(503, {"error": {"message": "loading"}}), answer(200)),
                            health_status={"/v1/models": 200})
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(resp.choices[0].message.content, "fake reply")
        self.assertEqual([g.path for g in server.gets], ["/health", "/v1/models"])

    async def test_garbage_status_line(self):
        server = await fake(self, garbage)
        direct = server_for(server.url)
        self.addCleanup(direct.close)
        with self.assertRaisesRegex(a.ProtocolError, "invalid HTTP status line") as caught:
            await direct.chat_completion(messages=MESSAGES)
        self.assertIn(server.url, str(caught.exception))

    async def test_oversize_and_overfull_heads(self):
        for handler, words in ((oversize_head, "larger than"), (too_many_headers, "more than 100")):
            server = await fake(self, handler)
            direct = server_for(server.url)
            self.addCleanup(direct.close)
            with self.subTest(handler=handler.__name__), self.assertRaisesRegex(a.ProtocolError, words):
                await direct.chat_completion(messages=MESSAGES)

    async def test_body_not_json(self):
        server = await fake(self, answer(200, b"<html>proxy error</html>"))
        direct = server_for(server.url)
        self.addCleanup(direct.close)
        with self.assertRaisesRegex(a.ProtocolError, "not JSON"):
            await direct.chat_completion(messages=MESSAGES)

    async def test_declared_huge_body_fails_at_once_without_buffering(self):
        server = await fake(self, huge_length)
        direct = server_for(server.url, timeout=20)
        self.addCleanup(direct.close)
        error, peak = await peak_memory(asyncio.wait_for(direct.chat_completion(messages=MESSAGES), 10))
        self.assertIsInstance(error, a.ResponseTooLargeError)
        self.assertIn(f"larger than {a.MAX_BODY_BYTES} bytes", str(error))
        self.assertLess(peak, 4 << 20, "the client read far less than the declared terabyte")
        manager = make_manager([server.url], timeout=20, max_retries=3)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.ResponseTooLargeError):
            await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(len(server.posts), 2, "too large is not retried")

    async def test_endless_bodies_stop_at_the_limit_with_bounded_memory(self):
        limit = 4 << 20
        for handler in (endless_chunked, endless_until_eof):
            server = await fake(self, handler)
            direct = server_for(server.url, timeout=20, max_body_bytes=limit)
            self.addCleanup(direct.close)
            error, peak = await peak_memory(asyncio.wait_for(direct.chat_completion(messages=MESSAGES), 10))
            with self.subTest(handler=handler.__name__):
                self.assertIsInstance(error, a.ResponseTooLargeError)
                self.assertIn(f"larger than {limit} bytes", str(error))
                self.assertIn(server.url, str(error))
                self.assertEqual(str(error).count(server.url), 1)
                self.assertLess(peak, 4 * limit)
            await until(lambda: server.open == 0, what="the client to drop the connection")
            self.assertLess(server.sent, 4 * limit, "the client stopped reading")

    async def test_endless_stream(self):
        server = await fake(self, endless_chunked)
        manager = make_manager([server.url], timeout=20, max_body_bytes=4 << 20)
        self.addAsyncCleanup(manager.close)
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        with self.assertRaises(a.ResponseTooLargeError):
            async for _ in stream:
                pass
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_idle_connections_closed_by_the_server_are_replaced(self):
        stubs = await start_stubs(self, 1, keep_alive_timeout=1)
        manager = make_manager([stub_url(stubs[0])])
        self.addAsyncCleanup(manager.close)
        pool = manager.servers[0]._pool
        await manager.chat_completion(messages=MESSAGES)
        await manager.chat_completion(messages=MESSAGES)
        self.assertEqual((pool.opened, pool.idle_count), (1, 1), "keep-alive reuses the connection")
        await asyncio.sleep(2)  # the stub closes it after 1 s idle
        resp = await manager.chat_completion(messages=MESSAGES)
        self.assertTrue(resp.choices[0].message.content.startswith("stub reply"))
        self.assertEqual(pool.opened, 2, "reconnected")
        self.assertTrue(manager.slots.records[0].healthy)


# =============================================================================================
# Streaming
# =============================================================================================


class Streaming(AsyncCase):
    async def test_a_finished_stream_returns_its_connection(self):
        stubs = await start_stubs(self, 1)
        manager = make_manager([stub_url(stubs[0])])
        self.addAsyncCleanup(manager.close)
        for _ in range(3):
            chunks = [c async for c in await manager.chat_completion(messages=MESSAGES, stream=True)]
            self.assertTrue(chunks)
        self.assertEqual(manager.servers[0]._pool.opened, 1, "read to its end, a stream's connection is reused")

    async def test_aborted_stream_raises(self):
        event = json.dumps({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "abort"}]})
        data = b"data: %s\n\ndata: [DONE]\n\n" % event.encode()
        server = await fake(self, raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)))
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        with self.assertRaises(a.GenerationAbortedError):
            async for _ in stream:
                pass
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_cancelled_consumer_and_stream_timeout_release_the_slot(self):
        server = await fake(self, sse_then_stall)
        manager = make_manager([server.url], timeout=1.5)
        self.addAsyncCleanup(manager.close)
        received = []

        async def consume():
            async for chunk in await manager.chat_completion(messages=MESSAGES, stream=True):
                received.append(chunk.choices[0].delta.content)

        task = asyncio.ensure_future(consume())
        await until(lambda: received == ["fake"], what="the first event")
        self.assertEqual(manager.slots.records[0].in_flight["train"], 1)
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0, "a cancelled consumer releases the slot")
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        self.assertEqual((await stream.__anext__()).choices[0].delta.content, "fake")
        with self.assertRaisesRegex(a.ServerTimeoutError, "stream timed out"):
            await asyncio.wait_for(stream.__anext__(), 10)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0, "a timed-out stream releases the slot")
        await until(lambda: server.open == 0, what="the client to close the stalled connections")

    async def test_stream_with_usage_through_the_manager(self):
        stubs = await start_stubs(self, 2)
        manager = make_manager([stub_url(s) for s in stubs])
        self.addAsyncCleanup(manager.close)
        stream = await manager.chat_completion(messages=MESSAGES, n=2, max_tokens=3, stream=True,
                                               stream_options={"include_usage": True})
        self.assertEqual(manager.slots.records[0].in_flight["train"], 1, "the stream holds its slot")
        chunks = [chunk async for chunk in stream]
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0, "released at [DONE]")
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.total_tokens, 8 + 2 * 3)
        self.assertTrue(all("usage" not in c for c in chunks[:-1]))
        text = {i: "".join(c.choices[0].delta.content for c in chunks[:-1] if c.choices[0].index == i)
                for i in (0, 1)}
        self.assertEqual(text[0], f"stub reply from {stubs[0].name}")
        self.assertEqual(text[1], text[0])

    async def test_early_close_releases_the_slot(self):
        stubs = await start_stubs(self, 1)
        manager = make_manager([stub_url(stubs[0])], cap=1)
        self.addAsyncCleanup(manager.close)
        stream = await manager.completion(prompt="p", n=3, stream=True)
        first = await stream.__anext__()
        self.assertEqual(first.choices[0].text, "stub ")
        await stream.aclose()
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        unstarted = await manager.completion(prompt="p", stream=True)
        await unstarted.aclose()
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        async with await manager.chat_completion(messages=MESSAGES, stream=True) as stream:
            async for chunk in stream:
                break
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        resp = await asyncio.wait_for(manager.chat_completion(messages=MESSAGES), 10)  # cap 1: the slot is free
        self.assertEqual(len(resp.choices), 1)

    async def test_stream_error_status_is_retried_like_any_call(self):
        server = await fake(self, after(1, answer(503, {"error": {"message": "busy"}}), sse_reply))
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        self.assertEqual([chunk.choices[0].delta.content async for chunk in stream], ["fake", " reply"])
        self.assertEqual(len(server.posts), 2)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_stream_broken_mid_way_releases_the_slot(self):
        server = await fake(self, sse_then_reset)
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        received = []
        with self.assertRaises(a.ServerConnectionError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        self.assertEqual(received, ["fake"])
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        self.assertEqual(manager.servers[0]._pool.idle_count, 0)


# =============================================================================================
# API key
# =============================================================================================


class ApiKey(AsyncCase):
    async def test_bearer_only_when_set_and_never_shown(self):
        key = "sk-very-secret-0123456789"
        server = await fake(self, after(2, answer(200), answer(401, {"error": "Unauthorized"})))
        with_key = make_manager([server.url], api_key=key)
        without = make_manager([server.url])
        self.addAsyncCleanup(with_key.close)
        self.addAsyncCleanup(without.close)
        await with_key.chat_completion(messages=MESSAGES)
        await without.chat_completion(messages=MESSAGES)
        self.assertEqual(server.posts[0].headers.get("authorization"), f"Bearer {key}")
        self.assertNotIn("authorization", server.posts[1].headers)
        self.assertEqual(server.posts[0].json()["model"], "test-model")
        with self.assertRaises(a.APIStatusError) as caught:
            await with_key.chat_completion(messages=MESSAGES)
        self.assertEqual(caught.exception.status, 401)
        down = make_manager([f"http://127.0.0.1:{closed_port()}/v1"], api_key=key, no_server_timeout=0.2)
        self.addAsyncCleanup(down.close)
        with self.assertRaises(a.NoHealthyServerError) as no_server:
            await down.chat_completion(messages=MESSAGES)
        shown = [repr(with_key), repr(with_key.servers[0]), repr(with_key.configs[0]), str(with_key.configs),
                 str(with_key.stats()), str(caught.exception), repr(caught.exception), str(no_server.exception),
                 repr(down)]
        for text in shown:
            self.assertNotIn(key, text)
            self.assertNotIn("secret", text)


# =============================================================================================
# Cancellation
# =============================================================================================


class Cancellation(AsyncCase):
    async def asyncSetUp(self):
        asyncio.get_running_loop().set_debug(False)  # debug mode records a traceback per callback: 20x slower

    async def test_ten_thousand_cancelled_requests_leave_nothing_behind(self):
        proc, base = spawn_stub_server(2, "--latency", "1")
        self.addCleanup(stop_process, proc)
        urls = [f"http://127.0.0.1:{base + i}/v1" for i in range(2)]
        manager = make_manager(urls, cap=50, timeout=10)
        self.addAsyncCleanup(manager.close)
        fds = open_fds()

        async def cancelled(i):
            try:
                await asyncio.wait_for(manager.chat_completion(messages=MESSAGES, split="eval" if i % 5 else "train"),
                                       0.01 + (i % 50) / 200)
            except asyncio.TimeoutError:
                return True
            return False

        outcomes = await asyncio.gather(*(cancelled(i) for i in range(10000)))
        # The stub answers after 1 s, the callers give up within 0.26 s; a starved loop may still
        # see a few answers first.  Those leave idle pooled connections, nothing else.
        self.assertGreater(sum(outcomes), 9000)
        for server in manager.slots.records:
            self.assertEqual(server.in_flight, {"train": 0, "eval": 0})
        self.assertEqual([manager.slots.waiting(split) for split in ("train", "eval")], [0, 0])
        self.assertTrue(all(s.healthy for s in manager.slots.records), "cancellation is not a server failure")
        idle = sum(s._pool.idle_count for s in manager.servers)
        self.assertLessEqual(idle, 10000 - sum(outcomes), "only answered calls leave a connection")
        await until(lambda: open_fds() <= fds + idle,
                    what=f"the client's sockets to close ({open_fds()} fds, was {fds} + {idle} idle)")
        # Still usable, and the caps still hold.
        results = await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(4)))
        self.assertEqual(len(results), 4)
        self.assertEqual([s.in_flight["train"] for s in manager.slots.records], [0, 0])

    async def test_failed_part_of_a_split_request_cancels_the_others(self):
        refusing = await fake(self, answer(400, {"error": {"message": "bad logprobs"}}))
        stubs = await start_stubs(self, 1, latency=1)
        manager = make_manager([refusing.url, stub_url(stubs[0])], max_n_completions=2)
        self.addAsyncCleanup(manager.close)
        with self.assertRaisesRegex(a.APIStatusError, "bad logprobs"):
            await manager.chat_completion(messages=MESSAGES, n=4)
        self.assertEqual([s.in_flight for s in manager.slots.records], [{"train": 0, "eval": 0}] * 2)

    async def test_cancelled_split_request_cancels_its_parts(self):
        stubs = await start_stubs(self, 2, latency=0.5)
        manager = make_manager([stub_url(s) for s in stubs], max_n_completions=2)
        self.addAsyncCleanup(manager.close)
        task = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES, n=8))
        await until(lambda: sum(s.in_flight for s in stubs) == 4, what="4 parts in flight")
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        self.assertEqual([s.in_flight["train"] for s in manager.slots.records], [0, 0])
        await until(lambda: all(s._pool.idle_count == 0 for s in manager.servers), what="pools")


# =============================================================================================
# CLI: wait and demo, as subprocesses
# =============================================================================================


def wait_argv(base, count, *extra):
    return ["wait", "--nodelist", "127.0.0.1", "--num-training-nodes", "0", "--gpus-per-node", str(count),
            "--base-port", str(base), "--hostlist-backend", "python", *extra]


class WaitCommand(unittest.TestCase):
    def test_succeeds_when_the_stubs_are_up(self):
        proc, base = spawn_stub_server(3)
        self.addCleanup(stop_process, proc)
        result = run_module(*wait_argv(base, 3, "--timeout", "20", "--interval", "0.1"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("3/3 servers healthy", result.stderr)
        self.assertIn("ready", result.stderr)

    def test_waits_for_a_server_that_starts_late(self):
        held = reserve_ports(2)  # bound, not listening: refused, and nobody else can take them
        base = held[0].getsockname()[1]
        for sock in held:
            self.addCleanup(sock.close)
        waiter = subprocess.Popen([sys.executable, "-m", "atropos_slurm",
                                   *wait_argv(base, 2, "--timeout", "20", "--interval", "0.1")],
                                  cwd=ROOT, env=module_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop_process, waiter)
        ready, _, _ = select.select([waiter.stderr], [], [], 15)
        self.assertTrue(ready)
        self.assertIn("0/2 servers healthy", waiter.stderr.readline())
        for sock in held:
            sock.close()
        proc, _ = spawn_stub_server(2, base=base)
        self.addCleanup(stop_process, proc)
        _, err = waiter.communicate(timeout=20)
        self.assertEqual(waiter.returncode, 0, err)
        self.assertIn("2/2 servers healthy", err)

    def test_timeout_lists_the_missing_server(self):
        proc, base = spawn_stub_server(1)
        self.addCleanup(stop_process, proc)
        missing = f"http://127.0.0.1:{base + 1}/v1"
        result = run_module(*wait_argv(base, 2, "--timeout", "2", "--interval", "0.1"))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("1/2 servers healthy", result.stderr)
        self.assertIn(missing, result.stderr.splitlines()[-1])
        self.assertNotIn(f"http://127.0.0.1:{base}/v1", result.stderr.splitlines()[-1])
        partial = run_module(*wait_argv(base, 2, "--timeout", "5", "--interval", "0.1", "--min-healthy", "1"))
        self.assertEqual(partial.returncode, 0, partial.stderr)

    def test_timeout_bounds_a_server_that_never_answers(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections in the kernel, never answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = run_module(*wait_argv(port, 1, "--timeout", "1", "--probe-timeout", "10"), timeout=30)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f"http://127.0.0.1:{port}/v1", result.stderr)
        self.assertLess(time.monotonic() - started, 9, "--timeout bounds the wait, not --probe-timeout")

    def test_bad_values_are_one_line_errors(self):
        cases = (("--timeout", "-1"), ("--min-healthy", "0"), ("--interval", "0"), ("--probe-timeout", "nan"),
                 ("--min-healthy", "3"), ("--timeout", "soon"))
        procs = [subprocess.Popen([sys.executable, "-m", "atropos_slurm", *wait_argv(9000, 2, flag, value)],
                                  cwd=ROOT, env=module_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for flag, value in cases]  # at once: 6 startups
        for proc in procs:
            self.addCleanup(stop_process, proc)
        for (flag, value), proc in zip(cases, procs):
            _, err = proc.communicate(timeout=30)
            with self.subTest(flag=flag, value=value):
                self.assertEqual(proc.returncode, 2)
                lines = err.strip().splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertIn(flag, lines[0])
                self.assertTrue(lines[0].startswith("atropos-slurm: error:"), lines[0])
                self.assertNotIn("Traceback", err)


class DemoCommand(unittest.TestCase):
    def test_a_bad_manager_knob_exits_2_with_one_line(self):
        result = run_module("demo", "--requests", "8", env={"ATROPOS_SLURM_RETRY_BUDGET": "lots"})
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("ATROPOS_SLURM_RETRY_BUDGET='lots' is not", result.stderr)

    def test_a_finite_but_overflowing_knob_exits_2_with_one_line(self):
        # 1e306 passed the check, then the budget's round(1e306 * 1000) raised OverflowError (a
        # traceback); an epsilon of 1e308 failed every request in the routing bound's ceil().
        for variable, value in (("ATROPOS_SLURM_RETRY_BUDGET", "1e306"), ("ATROPOS_SLURM_ROUTING_EPSILON", "1e308")):
            with self.subTest(variable=variable):
                result = run_module("demo", "--requests", "8", env={variable: value})
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertIn(f"{variable}='{value}' must be at most", result.stderr)

    def test_demo_prints_the_per_server_table(self):
        result = run_module("demo", "--requests", "400", timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        lines = result.stdout.splitlines()
        header = [i for i, line in enumerate(lines) if line.split()[:2] == ["server", "requests"]]
        self.assertEqual(len(header), 1, result.stdout)
        rows = [line.split() for line in lines[header[0] + 1:] if line.startswith("http://")]
        self.assertEqual(len(rows), 8)
        self.assertEqual(sum(int(r[1]) for r in rows), 400)
        self.assertEqual([r[-1] for r in rows].count("False"), 1, "the stopped server is shown down")
        self.assertIn("0 lost", result.stdout)


if __name__ == "__main__":
    unittest.main()
