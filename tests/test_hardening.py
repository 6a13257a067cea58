"""Regression tests for the dispatcher defects of the adversarial review (issue 10).

Each test names the item it holds ("item N").  Faults come from ``FakeServer`` handlers (a raw
loopback server that can misbehave on demand) and real ``StubServer`` instances elsewhere.

Run: ``python -m pytest tests/test_hardening.py -q``.
"""

import asyncio
import gc
import json
import os
import socket
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import atropos_slurm as a  # noqa: E402
from support import (  # noqa: E402
    AsyncCase, answer, chat_payload, fake, http_response, make_manager, raw, server_for, sse_chunks, stall,
    start_stubs, stub_url, until,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def numbered(fake_server, request, writer):
    """A chat answer whose text is the number of the POST it answers (1, 2, ...)."""
    return http_response(200, chat_payload(text=str(len(fake_server.posts))))


# =============================================================================================
# Item 1: no response mix-up
# =============================================================================================


class NoMixUp(AsyncCase):
    async def test_an_unrequested_response_after_the_body_never_answers_a_later_call(self):
        async def doubled(fake_server, request, writer):
            writer.write(numbered(fake_server, request, writer) + http_response(200, chat_payload(text="unasked")))
            return True

        server = await fake(self, doubled)
        direct = server_for(server.url)
        self.addCleanup(direct.close)
        texts = [(await direct.chat_completion(messages=MESSAGES)).choices[0].message.content for _ in range(4)]
        self.assertEqual(texts, ["1", "2", "3", "4"], "each call gets its own answer")
        self.assertEqual(direct._pool.opened, 4, "a connection that held extra bytes is not reused")

    async def test_bytes_arriving_while_idle_close_the_connection(self):
        async def then_junk(fake_server, request, writer):
            writer.write(numbered(fake_server, request, writer))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(http_response(200, chat_payload(text="unasked")))  # while the client idles
            return True

        server = await fake(self, then_junk)
        direct = server_for(server.url)
        self.addCleanup(direct.close)
        first = await direct.chat_completion(messages=MESSAGES)
        await asyncio.sleep(0.2)
        second = await direct.chat_completion(messages=MESSAGES)
        self.assertEqual([first.choices[0].message.content, second.choices[0].message.content], ["1", "2"])
        self.assertEqual(direct._pool.opened, 2)


# =============================================================================================
# Item 2: every byte ends in a response or a named error
# =============================================================================================


class HostileJSON(AsyncCase):
    async def test_bodies_that_are_not_openai_objects_are_protocol_errors(self):
        deep = b"[" * 100000 + b"]" * 100000
        bodies = {
            "deeply nested": deep,
            "deeply nested object": b'{"a":' * 50000 + b"1" + b"}" * 50000,
            "choices is a number": b'{"choices": 5}',
            "choices holds numbers": b'{"choices": [1, 2]}',
            "true": b"true",
            "a list": b"[1]",
        }
        for name, body in bodies.items():
            with self.subTest(body=name):
                server = await fake(self, raw(http_response(200, body)))
                direct = server_for(server.url)
                self.addCleanup(direct.close)
                with self.assertRaises(a.ProtocolError) as caught:
                    await direct.chat_completion(messages=MESSAGES)
                self.assertIn(server.url, str(caught.exception))

    async def test_a_5xx_with_a_hostile_body_is_retried_and_marks_the_server_down(self):
        hostile = await fake(self, raw(http_response(503, b'{"error": {"message": ' * 5000 + b"1" + b"}}" * 5000)))
        stubs = await start_stubs(self, 1)
        manager = make_manager([hostile.url, stub_url(stubs[0])])
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES)
        self.assertTrue(resp.choices[0].message.content.startswith("stub reply"))
        self.assertFalse(manager.slots.records[0].healthy)
        self.assertIn("HTTP 503", manager.slots.records[0].last_error)

    async def test_stream_events_that_are_not_objects_are_protocol_errors(self):
        for data in (b"5", b"[1]", b"null", b'{"choices": "x"}', b"[" * 100000):
            with self.subTest(event=data[:10]):
                body = b"data: " + data + b"\n\ndata: [DONE]\n\n"
                server = await fake(self, raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body)))
                manager = make_manager([server.url])
                self.addAsyncCleanup(manager.close)
                stream = await manager.chat_completion(messages=MESSAGES, stream=True)
                with self.assertRaises(a.ProtocolError):
                    async for _ in stream:
                        pass
                self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_malformed_choices_in_a_split_call_is_a_protocol_error(self):
        server = await fake(self, raw(http_response(200, b'{"choices": {"0": "x"}}')))
        manager = make_manager([server.url], max_retries=0)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.ProtocolError):
            await manager.chat_completion(messages=MESSAGES, n=12)

    def test_error_message_survives_any_body(self):
        for body in (b"[" * 100000, b'{"error": {"message": [1, 2]}}', b'{"detail": {"x": 1}}', b"\xff\xfe"):
            with self.subTest(body=body[:10]):
                self.assertIsInstance(a.error_message(body), str)


# =============================================================================================
# Items 3 and 10: streams never leak a slot; [DONE] ends a stream at once
# =============================================================================================


class StreamSlots(AsyncCase):
    async def manager_over_stub(self, cap=1):
        stubs = await start_stubs(self, 1)
        manager = make_manager([stub_url(stubs[0])], cap=cap, timeout=5)
        self.addAsyncCleanup(manager.close)
        return manager

    async def test_a_dropped_unread_stream_gives_back_its_slot(self):
        manager = await self.manager_over_stub()
        stream = await manager.chat_completion(messages=MESSAGES, stream=True)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 1)
        del stream
        gc.collect()
        await until(lambda: manager.slots.records[0].in_flight["train"] == 0, what="the slot back")
        resp = await manager.chat_completion(messages=MESSAGES)  # would wait forever for the one slot
        self.assertTrue(resp.choices)

    async def test_a_stream_left_after_break_gives_back_its_slot(self):
        manager = await self.manager_over_stub()

        async def first_chunk():
            async for chunk in await manager.chat_completion(messages=MESSAGES, stream=True):
                return chunk

        self.assertIsNotNone(await first_chunk())
        gc.collect()
        await until(lambda: manager.slots.records[0].in_flight["train"] == 0, what="the slot back")

    async def test_a_stream_lost_in_a_cancelled_gather_gives_back_its_slot(self):
        manager = await self.manager_over_stub()

        async def fail_later():
            await asyncio.sleep(0.1)
            raise RuntimeError("a sibling failed")

        with self.assertRaises(RuntimeError):
            await asyncio.gather(manager.chat_completion(messages=MESSAGES, stream=True), fail_later())
        gc.collect()
        await until(lambda: manager.slots.records[0].in_flight["train"] == 0, what="the slot back")

    async def test_waiting_for_a_slot_is_bounded_by_the_timeout(self):
        stubs = await start_stubs(self, 1)
        manager = make_manager([stub_url(stubs[0])], cap=1, timeout=0.5)
        self.addAsyncCleanup(manager.close)
        held = await manager.chat_completion(messages=MESSAGES, stream=True)  # holds the one slot, unread
        with self.assertRaisesRegex(a.ServerTimeoutError, "no free slot within timeout=0.5 s"):
            await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(manager.slots.waiting("train"), 0, "the timed-out call left the line")
        await held.aclose()
        self.assertTrue((await manager.chat_completion(messages=MESSAGES)).choices)

    async def test_after_done_a_stream_ends_at_once_and_closes_an_unfinished_body(self):
        async def done_then_stall(fake_server, request, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + sse_chunks("hello"))  # [DONE] but no terminating 0-chunk
            await writer.drain()
            await fake_server.stopping.wait()

        server = await fake(self, done_then_stall)
        manager = make_manager([server.url], timeout=30)
        self.addAsyncCleanup(manager.close)
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks = [c async for c in await manager.chat_completion(messages=MESSAGES, stream=True)]
        self.assertEqual([c.choices[0].delta.content for c in chunks], ["hello"])
        self.assertLess(loop.time() - started, 10, "not held until the 30 s timeout")
        self.assertEqual(manager.servers[0]._pool.idle_count, 0, "an unfinished body's connection is closed")
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)


# =============================================================================================
# Item 4: error events inside a stream
# =============================================================================================


class StreamErrorEvents(AsyncCase):
    async def test_an_error_event_raises_stream_error_after_the_partial_text(self):
        error = json.dumps({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
        data = (b'data: {"choices": [{"index": 0, "delta": {"content": "par"}}]}\n\n'
                + b"data: " + error.encode() + b"\n\ndata: [DONE]\n\n")
        server = await fake(self, raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(data), data)))
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        seen = []
        with self.assertRaisesRegex(a.StreamError, "engine died"):
            async for chunk in await manager.chat_completion(messages=MESSAGES, stream=True):
                seen.append(chunk.choices[0].delta.content)
        self.assertEqual(seen, ["par"])
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)


# =============================================================================================
# Item 5: a caller's cancellation is never swallowed (3.9 and 3.10 included)
# =============================================================================================


class CancellationRace(unittest.IsolatedAsyncioTestCase):
    async def race(self, order):
        """Run ``with _Deadline: await future`` and fire the deadline and an outside cancel in
        the same loop iteration, in ``order``; return what the task raised."""
        loop = asyncio.get_running_loop()
        never = loop.create_future()
        entered = asyncio.Event()
        holder = {}

        async def body():
            with a._Deadline(3600, "deadline", "http://x") as deadline:
                holder["deadline"] = deadline
                entered.set()
                await never

        task = asyncio.ensure_future(body())
        await entered.wait()
        await asyncio.sleep(0)
        for who in order:
            if who == "deadline":
                holder["deadline"].expire()
            else:
                task.cancel()
        try:
            await task
        except BaseException as e:  # noqa: B902 (CancelledError is what we look for)
            return e
        return None

    async def test_deadline_alone_is_a_timeout(self):
        self.assertIsInstance(await self.race(["deadline"]), a.ServerTimeoutError)

    async def test_outside_cancel_alone_is_a_cancellation(self):
        self.assertIsInstance(await self.race(["cancel"]), asyncio.CancelledError)

    async def test_deadline_then_cancel_in_one_iteration_is_a_cancellation(self):
        self.assertIsInstance(await self.race(["deadline", "cancel"]), asyncio.CancelledError)

    async def test_cancel_then_deadline_in_one_iteration_is_a_cancellation(self):
        self.assertIsInstance(await self.race(["cancel", "deadline"]), asyncio.CancelledError)

    async def test_a_cancelled_call_is_not_retried(self):
        server = await fake(self, stall)
        manager = make_manager([server.url], timeout=0.3, max_retries=5)
        self.addAsyncCleanup(manager.close)
        task = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await until(lambda: len(server.posts) == 1, what="the call at the server")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, task.cancel)  # about when the request's own deadline passes
        with self.assertRaises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        self.assertEqual(len(server.posts), 1, "cancelled, never retried")


# =============================================================================================
# Item 9 (and 19): split calls
# =============================================================================================


class SplitCalls(AsyncCase):
    async def test_a_part_failing_for_good_cancels_its_siblings_at_once(self):
        async def first_fails_others_stall(fake_server, request, writer):
            if len(fake_server.posts) == 1:
                writer.write(http_response(400, {"error": {"message": "bad n"}}))
                return True
            await request.reader.read()  # until the client hangs up
            fake_server.seen["hung up"] = fake_server.seen.get("hung up", 0) + 1
            return False

        server = await fake(self, first_fails_others_stall)
        manager = make_manager([server.url], timeout=30, max_n_completions=4)
        self.addAsyncCleanup(manager.close)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with self.assertRaises(a.APIStatusError):
            await manager.chat_completion(messages=MESSAGES, n=8)
        self.assertLess(loop.time() - started, 10, "raised at once, not after the sibling's timeout")
        await until(lambda: server.seen.get("hung up") == 1, what="the sibling's connection to close")
        self.assertEqual(len(server.posts), 2, "the sibling was not retried")
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_429_storm_is_bounded_per_part(self):
        server = await fake(self, answer(429, {"error": {"message": "slow down"}}))
        manager = make_manager([server.url], max_retries=2, max_n_completions=4)
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.APIStatusError) as caught:
            await manager.chat_completion(messages=MESSAGES, n=8)
        self.assertLessEqual(len(server.posts), 2 * 3, "at most max_retries + 1 requests per part")
        self.assertEqual(caught.exception.status, 429)

    async def test_usage_is_summed_over_an_even_split(self):
        stubs = await start_stubs(self, 1)
        manager = make_manager([stub_url(stubs[0])], max_n_completions=4)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES, n=8, max_tokens=3)
        self.assertEqual([c.index for c in resp.choices], list(range(8)))
        self.assertEqual(resp.usage.completion_tokens, 8 * 3)
        self.assertEqual(resp.usage.prompt_tokens, 2 * 8, "each part's prompt counted")


# =============================================================================================
# Item 15: an early answer before the server stops reading
# =============================================================================================


class EarlyAnswer(AsyncCase):
    async def test_413_before_reading_a_large_body_is_that_status(self):
        async def refuse_at_once(reader, writer):
            await reader.readuntil(b"\r\n\r\n")  # the head only, never the body
            writer.write(http_response(413, {"error": {"message": "request too large"}}, [("Connection", "close")]))
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()  # unread request bytes: the kernel answers them with a reset

        listener = await asyncio.start_server(refuse_at_once, "127.0.0.1", 0)
        self.addAsyncCleanup(listener.wait_closed)
        self.addCleanup(listener.close)
        url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1"
        manager = make_manager([url])
        self.addAsyncCleanup(manager.close)
        with self.assertRaises(a.APIStatusError) as caught:
            await manager.chat_completion(messages=[{"role": "user", "content": "x" * (32 << 20)}])
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("request too large", str(caught.exception))
        self.assertEqual(caught.exception.attempts, 1, "not retried")
        self.assertTrue(manager.slots.records[0].healthy, "a 413 is no sign of death")


# =============================================================================================
# Requests leave together at the end of the loop iteration (issue 12): nothing lost or sent late
# =============================================================================================


async def answer_numbered(fake_server, request, writer):
    writer.write(numbered(fake_server, request, writer))
    return True


class SentTogether(AsyncCase):
    async def test_the_requests_of_one_iteration_leave_together_and_all_get_their_answer(self):
        server = await fake(self, answer_numbered)
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        await manager.chat_completion(messages=MESSAGES)  # one connection opened and idle
        calls = [asyncio.ensure_future(manager.chat_completion(messages=MESSAGES)) for _ in range(20)]
        await asyncio.sleep(0)  # every call ran up to its write: none has left yet
        self.assertEqual(len(server.posts), 1)
        self.assertEqual(len(a._OUTBOXES.get(asyncio.get_running_loop(), ())), 1,
                         "written in this iteration, waiting for its end (the others are connecting)")
        texts = sorted(int(r.choices[0].message.content) for r in await asyncio.gather(*calls))
        self.assertEqual(texts, list(range(2, 22)), "each call got its own answer")

    async def test_a_call_cancelled_while_its_request_waits_to_leave_loses_nothing(self):
        server = await fake(self, answer_numbered)
        manager = make_manager([server.url])
        self.addAsyncCleanup(manager.close)
        await manager.chat_completion(messages=MESSAGES)
        call = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await asyncio.sleep(0)  # written, not yet sent
        call.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await call
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0, "its slot is back")
        later = await manager.chat_completion(messages=MESSAGES)
        self.assertEqual(later.choices[0].message.content, str(len(server.posts)),
                         "the next call gets its own answer, not the cancelled one's")

    def test_a_burst_leaves_at_once_the_rest_at_the_iterations_end(self):
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        transports = [Transport() for _ in range(a._SEND_BURST + 3)]
        for i, t in enumerate(transports):
            a._send_soon(loop, t, b"%d" % i)
        self.assertEqual([t.sent for t in transports[:a._SEND_BURST]], [[b"%d" % i] for i in range(a._SEND_BURST)],
                         "a full burst is sent at once, in order")
        self.assertEqual([t.sent for t in transports[a._SEND_BURST:]], [[], [], []])
        loop.run_until_complete(asyncio.sleep(0))
        self.assertEqual([t.sent for t in transports[a._SEND_BURST:]],
                         [[b"%d" % i] for i in range(a._SEND_BURST, a._SEND_BURST + 3)])
        self.assertNotIn(loop, a._OUTBOXES)

    def test_a_transport_failing_its_write_is_aborted_and_the_rest_still_leave(self):
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        first, broken, last = Transport(), Transport(broken=True), Transport()
        for t in (first, broken, last):
            a._send_soon(loop, t, b"request")
        loop.run_until_complete(asyncio.sleep(0))
        self.assertEqual((first.sent, last.sent), ([b"request"], [b"request"]))
        self.assertTrue(broken.aborted, "its caller reads a closed connection, it does not wait forever")

    def test_a_loop_closed_before_its_last_iteration_leaves_nothing_behind(self):
        closed, running = asyncio.new_event_loop(), asyncio.new_event_loop()
        lost = Transport()
        a._send_soon(closed, lost, b"never sent")
        closed.close()  # its flush never ran
        sent, shut = Transport(), Transport(closing=True)
        a._send_soon(running, sent, b"sent")
        a._send_soon(running, shut, b"its call ended before it left")
        self.assertNotIn(closed, a._OUTBOXES, "the closed loop's writes are dropped, not kept")
        running.run_until_complete(asyncio.sleep(0))
        running.close()
        self.assertEqual((lost.sent, sent.sent, shut.sent), ([], [b"sent"], []))
        self.assertNotIn(running, a._OUTBOXES)


class Transport:
    """What ``_send_soon`` uses of a transport; ``broken`` ones raise on write."""

    def __init__(self, closing=False, broken=False):
        self.closing, self.broken, self.sent, self.aborted = closing, broken, [], False

    def is_closing(self):
        return self.closing

    def write(self, data):
        if self.broken:
            raise RuntimeError("broken transport")
        self.sent.append(data)

    def abort(self):
        self.aborted = self.closing = True


# =============================================================================================
# Item 16: close() while calls run
# =============================================================================================


class CloseWhileRunning(AsyncCase):
    async def test_running_calls_finish_new_ones_are_refused_connections_closed(self):
        stubs = await start_stubs(self, 1, latency=0.3)
        manager = make_manager([stub_url(stubs[0])])
        running = [asyncio.ensure_future(manager.chat_completion(messages=MESSAGES)) for _ in range(3)]
        await until(lambda: stubs[0].in_flight == 3, what="the calls at the server")
        await manager.close()
        with self.assertRaises(a.ManagerClosedError):
            await manager.chat_completion(messages=MESSAGES)
        results = await asyncio.gather(*running)
        self.assertEqual(len(results), 3, "calls running at close() finish")
        self.assertEqual(manager.servers[0]._pool.idle_count, 0, "their connections are closed, not pooled")

    async def test_no_probe_restarts_after_close(self):
        server = await fake(self, answer(500))
        manager = make_manager([server.url], max_retries=0)
        with self.assertRaises(a.APIStatusError):
            await manager.chat_completion(messages=MESSAGES)
        self.assertFalse(manager.slots.records[0].healthy)
        await manager.close()
        gets = len(server.gets)
        manager._probe_all_down()
        await asyncio.sleep(0.3)
        self.assertEqual(len(server.gets), gets, "no probe after close()")


# =============================================================================================
# Item 19: what the suite missed when the module was broken on purpose
# =============================================================================================


class MissedBefore(AsyncCase):
    def test_connect_and_health_timeouts_must_be_positive(self):
        for name in ("connect_timeout", "health_timeout"):
            for value in (0, -1, 0.0):
                with self.subTest(name=name, value=value), self.assertRaisesRegex(a.ConfigError, name):
                    a.ServerBaseline(**{name: value})

    def test_idle_limit_stays_under_the_servers_keep_alive(self):
        self.assertLess(a.POOL_IDLE_SECONDS, 5.0, "uvicorn and llama.cpp close idle connections after 5 s")

    async def test_an_idle_connection_past_the_limit_is_not_reused(self):
        stubs = await start_stubs(self, 1, keep_alive_timeout=60)
        direct = server_for(stub_url(stubs[0]))
        self.addCleanup(direct.close)
        await direct.chat_completion(messages=MESSAGES)
        direct._pool._idle[-1].idle_since -= a.POOL_IDLE_SECONDS + 0.01
        await direct.chat_completion(messages=MESSAGES)
        self.assertEqual(direct._pool.opened, 2)
        direct._pool._idle[-1].idle_since -= a.POOL_IDLE_SECONDS - 0.5
        await direct.chat_completion(messages=MESSAGES)
        self.assertEqual(direct._pool.opened, 2, "younger than the limit: reused")

    async def test_waiting_for_a_slot_schedules_no_periodic_timers(self):
        server = await fake(self, stall)
        manager = make_manager([server.url], cap=1, timeout=20)
        self.addAsyncCleanup(manager.close)
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await until(lambda: len(server.posts) == 1, what="the first call at the server")
        waiting = [asyncio.ensure_future(manager.chat_completion(messages=MESSAGES)) for _ in range(5)]
        await asyncio.sleep(0.05)
        timers = len(loop._scheduled)
        await asyncio.sleep(0.5)
        self.assertEqual(len(loop._scheduled), timers, "no timer re-armed while waiting (no polling)")
        self.assertEqual(manager.slots.waiting("train"), 5)
        for task in [first, *waiting]:
            task.cancel()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        self.assertEqual(manager.slots.waiting("train"), 0)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)

    async def test_a_server_back_after_seconds_down_is_healthy_within_twice_the_probe_interval(self):
        interval = 1.0
        stubs = await start_stubs(self, 1)
        port = stubs[0].port
        manager = make_manager([stub_url(stubs[0])], health_probe_interval=interval, max_retries=0)
        self.addAsyncCleanup(manager.close)
        await stubs[0].stop()
        with self.assertRaises(a.ServerConnectionError):
            await manager.chat_completion(messages=MESSAGES)
        self.assertFalse(manager.slots.records[0].healthy)
        await asyncio.sleep(3.0)  # the probe backs off to its interval meanwhile
        loop = asyncio.get_running_loop()
        back = await a.StubServer("127.0.0.1", port).start()
        self.addAsyncCleanup(back.stop)
        started = loop.time()
        await until(lambda: manager.slots.records[0].healthy, timeout=10, what="the server to be probed back")
        self.assertLess(loop.time() - started, 2 * interval + 1.0, "the probe's backoff is capped by its interval")

    async def test_a_call_queued_behind_a_full_server_gets_no_healthy_server_when_it_dies(self):
        async def stall_then_die(fake_server, request, writer):
            await asyncio.sleep(0.3)
            return False  # closes without answering: connection error, server marked down

        server = await fake(self, stall_then_die, health_status=503)
        manager = make_manager([server.url], cap=1, max_retries=0, no_server_timeout=0.5)
        self.addAsyncCleanup(manager.close)
        first = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        await until(lambda: len(server.posts) == 1, what="the first call at the server")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with self.assertRaises(a.NoHealthyServerError):
            await manager.chat_completion(messages=MESSAGES)
        self.assertLess(loop.time() - started, 0.3 + 0.5 + 3, "bounded by no_server_timeout after the death")
        with self.assertRaises(a.ServerConnectionError):
            await first



# =============================================================================================
# Issue 16: the smaller defects (split usage, credentials in a URL's query, update_weight)
# =============================================================================================


class SmallerDefects(AsyncCase):
    async def test_a_malformed_usage_in_any_part_of_a_split_call_is_a_protocol_error(self):
        bad_usages = [{"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": "7"},
                      {"prompt_tokens": 1, "completion_tokens": True, "total_tokens": 5}, "abc", [1, 2]]
        for bad in bad_usages:
            with self.subTest(usage=bad):
                async def second_part_bad(fake_server, request, writer, bad=bad):
                    payload = chat_payload(n=request.json()["n"])
                    if len(fake_server.posts) == 2:
                        payload["usage"] = bad
                    writer.write(http_response(200, payload))
                    return True

                server = await fake(self, second_part_bad)
                manager = make_manager([server.url], max_n_completions=4)
                self.addAsyncCleanup(manager.close)
                with self.assertRaisesRegex(a.ProtocolError, "usage"):
                    await manager.chat_completion(messages=MESSAGES, n=8)
        # Well-formed parts are summed; a part without usage adds nothing.
        async def one_without(fake_server, request, writer):
            payload = chat_payload(n=request.json()["n"])
            if len(fake_server.posts) == 2:
                del payload["usage"]
            writer.write(http_response(200, payload))
            return True

        server = await fake(self, one_without)
        manager = make_manager([server.url], max_n_completions=4)
        self.addAsyncCleanup(manager.close)
        resp = await manager.chat_completion(messages=MESSAGES, n=8)
        self.assertEqual(resp.usage.completion_tokens, 4)

    def test_a_credential_in_a_base_urls_query_or_fragment_is_never_shown(self):
        for url in ("http://node1:9000/v1?api_key=sk-secret-123", "http://node1:9000/v1#sk-secret-123",
                    "http://u:sk-secret-123@node1:9000/v1?key=sk-secret-123", "http://node1:9000/v1?a=1#sk-secret-123"):
            with self.subTest(url=url):
                with self.assertRaises(a.ConfigError) as caught:
                    a.APIServerConfig(base_url=url)
                self.assertNotIn("secret", str(caught.exception))
                self.assertIn("node1:9000", str(caught.exception))
        self.assertEqual(a._shown_url("http://h:1/v1?api_key=sk-1#f"), "'http://h:1/v1?***'")

    async def test_update_weight_refuses_a_weight_that_overflows_and_keeps_every_cap_at_least_one(self):
        stubs = await start_stubs(self, 2)
        manager = make_manager([stub_url(s) for s in stubs], cap=512, eval_cap=64)
        self.addAsyncCleanup(manager.close)
        for huge in (1e308, 1e306):  # 512 x 1e306 is past the largest float
            with self.assertRaisesRegex(a.ConfigError, "weight="):
                await manager.update_weight(huge)
        self.assertEqual([s.caps for s in manager.slots.records], [{"train": 512, "eval": 64}] * 2, "nothing changed")
        await manager.update_weight(1e-12)
        self.assertEqual([s.caps for s in manager.slots.records], [{"train": 1, "eval": 1}] * 2)
        resp = await asyncio.wait_for(manager.chat_completion(messages=MESSAGES, split="eval"), 10)
        self.assertEqual(len(resp.choices), 1, "an eval call gets its slot, it does not wait for the slot timeout")
        await manager.update_weight(0)
        self.assertEqual(manager.slots.records[0].caps, {"train": 0, "eval": 0})
        self.assertEqual([a.weighted_cap(10, w) for w in (0, 1e-300, 0.01, 0.3, 1.5)], [0, 1, 1, 3, 15])


if __name__ == "__main__":
    unittest.main()
