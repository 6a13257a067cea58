"""What the test files share: optional parts, ports, loops, processes, fake servers, a trainer API.

One helper per need, one meaning per name:

* ``require``: a missing optional part (scontrol, wandb, a Slurm lab, vLLM, atroposlib) skips
  a test locally but fails it when ``ATROPOS_TEST_REQUIRE`` names it (CI: ``all``).
* ``run_cli`` runs ``atropos_slurm.main`` in this process; ``run_module`` runs
  ``python -m atropos_slurm`` as a subprocess.
* Ports: ``free_port_block``, ``reserve_ports`` (the module's ``reserve_port_block``) and ``closed_port`` pick ports below the
  kernel's ephemeral range, where no client socket (nor a TCP self-connect) can take one.
* ``LoopThread``: an event loop in a thread, for servers beside code that runs its own
  ``asyncio.run``.  ``AsyncCase``: a bounded ``IsolatedAsyncioTestCase`` with quiet logs.
* ``StubServer`` helpers (real servers) and ``FakeServer`` with its handlers (faults no real
  server produces on demand: stalls, resets, garbage bytes, oversize heads and bodies).
* ``TrainerAPIStub``: Atropos' ``run-api`` (``/wandb_info``, ``/status``) driven by the test.
"""

import asyncio
import atexit
import collections
import contextlib
import functools
import http.server
import io
import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import unittest
from typing import Any, List, Optional
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atropos_slurm as a  # noqa: E402
from atropos_slurm import APIServerConfig, ServerManager  # noqa: E402

LIMIT = 30.0  # seconds: the bound on any one async test of an AsyncCase


# =============================================================================================
# Optional parts
# =============================================================================================


def require(feature: str, available: bool, how: str) -> None:
    """Skip when ``feature`` is missing, unless ``ATROPOS_TEST_REQUIRE`` lists it (or ``all``): then fail.

    CI sets ``ATROPOS_TEST_REQUIRE=all``, so a skipped check can never pass for a green run.
    """
    if available:
        return
    required = {f.strip() for f in os.environ.get("ATROPOS_TEST_REQUIRE", "").split(",")}
    message = f"{feature} is not available here; {how}"
    if feature in required or "all" in required:
        raise AssertionError(message + " (required by ATROPOS_TEST_REQUIRE)")
    raise unittest.SkipTest(message)


# =============================================================================================
# Running the CLI
# =============================================================================================


def module_env(env=None):
    """``env`` (default: this process's) with the repository on ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*argv, env=None):
    """Run ``atropos_slurm.main`` in this process; return (exit code, stdout, stderr).

    ``env`` replaces the environment for the call (``None`` keeps it).
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.dict(os.environ, env or {}, clear=env is not None):
        code = a.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def run_module(*argv, env=None, cwd=None, timeout=60):
    """``python -m atropos_slurm ...`` as a subprocess (a ``CompletedProcess``); bounded by ``timeout``."""
    return subprocess.run([sys.executable, "-m", "atropos_slurm", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=module_env(env), stdin=subprocess.DEVNULL)


# =============================================================================================
# Ports
# =============================================================================================


def reserve_ports(count: int, host: str = "127.0.0.1") -> List[socket.socket]:
    """``count`` sockets bound (not listening: connections are refused) to consecutive ports
    below the ephemeral range.  Close them just before a server takes the ports over."""
    return a.reserve_port_block(count, host)


free_port_block = a.free_port_block


_held: List[socket.socket] = []  # closed_port's sockets, held for the life of the test process


@atexit.register
def _release_held() -> None:
    """Close ``closed_port``'s sockets at exit rather than leave them to the GC (a ResourceWarning each)."""
    for sock in _held:
        sock.close()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port that refuses connections for the life of the test process (bound, never listening)."""
    sock = reserve_ports(1, host)[0]
    _held.append(sock)
    return sock.getsockname()[1]


# =============================================================================================
# Loops and waiting
# =============================================================================================


class LoopThread:
    """An event loop in a daemon thread: servers beside code that runs its own ``asyncio.run``.

    ``with LoopThread() as lt: stub = lt.start_stub(port)``; ``lt.run(coro)`` runs any coroutine
    there.  Stubs started here are stopped when the block ends.
    """

    def __enter__(self) -> "LoopThread":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stubs: List[a.StubServer] = []
        return self

    def run(self, coro, timeout=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_stub(self, port: int = 0, stub_class: type = a.StubServer, **options: Any) -> a.StubServer:
        stub = self.run(stub_class("127.0.0.1", port, **options).start())
        self.stubs.append(stub)
        return stub

    def stop_stub(self, stub: a.StubServer) -> None:
        self.run(stub.stop())

    def __exit__(self, *exc) -> None:
        for stub in self.stubs:
            self.run(stub.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RecordingStub(a.StubServer):
    """A ``StubServer`` that keeps every completion request it got as (path, JSON body): what a
    client sent, to compare clients on the wire."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.requests: List[tuple] = []

    async def _complete(self, path, body, writer, close):
        self.requests.append((path, json.loads(body)))
        return await super()._complete(path, body, writer, close)


class AsyncCase(unittest.IsolatedAsyncioTestCase):
    """Each ``test_*`` coroutine is bounded by ``LIMIT``; the module's warnings are muted."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, fn in list(vars(cls).items()):
            if name.startswith("test") and asyncio.iscoroutinefunction(fn):
                setattr(cls, name, cls._bounded(fn))

    @staticmethod
    def _bounded(fn):
        @functools.wraps(fn)
        async def test(self):
            await asyncio.wait_for(fn(self), LIMIT)
        return test

    def setUp(self):
        mute_logs(self)


def mute_logs(case: unittest.TestCase) -> None:
    logger = logging.getLogger("atropos_slurm")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    case.addCleanup(logger.setLevel, level)


def make_manager(urls, *, timeout=20.0, cap=64, eval_cap=16, api_key="", max_body_bytes=None, **kwargs):
    """A manager over ``urls`` with fast retries and probes (the defaults suit GPUs, not tests).

    Timeouts not under test are generous: a loaded 2-core machine can starve the loop for seconds.
    """
    template = APIServerConfig(timeout=timeout, num_max_requests_at_once=cap, num_requests_for_eval=eval_cap,
                               model_name="test-model", api_key=api_key, connect_timeout=20, health_timeout=5)
    # Round-robin unless a test asks for prefix routing: most tests send one prompt again and again.
    options = dict(retry_backoff=0.01, retry_backoff_max=0.05, no_server_timeout=20, health_probe_interval=0.05,
                   routing="round_robin")
    options.update(kwargs)
    if max_body_bytes is not None:
        options["server_class"] = functools.partial(a.OpenAIServer, max_body_bytes=max_body_bytes)
    return ServerManager(a.configs_for_urls(template, urls), **options)


def server_for(url, *, timeout=20.0, api_key="", **kwargs):
    """One ``OpenAIServer`` (exactly one HTTP request per call, no retries)."""
    return a.OpenAIServer(APIServerConfig(base_url=url, timeout=timeout, api_key=api_key, connect_timeout=20), **kwargs)


async def start_stubs(case, count, **options):
    """``count`` started stubs on consecutive ports (discovery needs a block), stopped at cleanup."""
    for _ in range(50):
        base = free_port_block(count)
        stubs = []
        try:
            for i in range(count):
                stubs.append(await a.StubServer("127.0.0.1", base + i, **options).start())
        except OSError:
            for stub in stubs:
                await stub.stop()
            continue
        for stub in stubs:
            case.addAsyncCleanup(stub.stop)
        return stubs
    raise RuntimeError(f"no {count} consecutive free ports")


def stub_url(stub) -> str:
    return f"http://127.0.0.1:{stub.port}/v1"


async def until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def spawn_stub_server(count, *extra, base=None):
    """``python -m atropos_slurm stub-server`` on ``count`` consecutive ports; (process, base port)."""
    for _ in range(20):
        port = base or free_port_block(count)
        proc = subprocess.Popen([sys.executable, "-m", "atropos_slurm", "stub-server", "--port", str(port),
                                 "--count", str(count), *extra], cwd=ROOT, env=module_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        ready, _, _ = select.select([proc.stderr], [], [], 15)
        line = proc.stderr.readline() if ready else ""
        if "listening" in line:
            return proc, port
        proc.kill()
        proc.communicate(timeout=10)
        if base:
            break
    raise RuntimeError(f"stub-server did not start: {line!r}")


def stop_process(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


async def peak_memory(coro):
    """(result or exception, bytes allocated at the peak while ``coro`` ran)."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        outcome = await coro
    except Exception as e:
        outcome = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if not tracing:
            tracemalloc.stop()
    return outcome, peak


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- a raw socket server for faults ----------------------------------------------------------


class Request:
    __slots__ = ("method", "path", "headers", "body", "time", "reader")

    def __init__(self, method, path, headers, body, reader):
        self.method, self.path, self.headers, self.body, self.reader = method, path, headers, body, reader
        self.time = time.monotonic()

    def json(self):
        return json.loads(self.body)


def http_response(status, payload=b"", headers=(), reason="Whatever"):
    """One response with a Content-Length; ``payload`` bytes, or a dict/list sent as JSON."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
        headers = [("Content-Type", "application/json"), *headers]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def chat_payload(n=1, text="fake reply"):
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": 1 + n}}


def reset(writer):
    """Drop the connection with a TCP RST rather than a FIN."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FakeServer:
    """A raw HTTP server for faults.  GETs (health probes) get ``health_status``, a status or a
    dict of them by path; every POST is recorded in ``posts`` and handed to
    ``handler(fake, request, writer)``, which writes what it likes and returns False to drop
    the connection without another byte.
    """

    def __init__(self, handler, health_status=200):
        self.handler, self.health_status = handler, health_status
        self.posts, self.gets = [], []
        self.seen = {}  # requests per connection (writer)
        self.open = self.accepted = 0
        self.sent = 0  # body bytes written by streaming handlers
        self._tasks = set()
        self._writers = set()

    async def start(self):
        self.stopping = asyncio.Event()  # handlers that hold a connection wait on it
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        return self

    async def stop(self):
        """Ends every handler without cancelling it (Python 3.11 logs cancelled stream handlers)."""
        self._server.close()
        self.stopping.set()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await self._server.wait_closed()

    async def _serve(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        self._writers.add(writer)
        self.accepted += 1
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = Request(method, path, headers, body, reader)
                if method == "GET":
                    self.gets.append(request)
                    status = self.health_status
                    if isinstance(status, dict):  # per path, 404 elsewhere
                        status = status.get(path, 404)
                    writer.write(http_response(status, b"", [("Connection", "close")]))
                    await writer.drain()
                    break
                self.posts.append(request)
                if not await self.handler(self, request, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            self._tasks.discard(asyncio.current_task())
            writer.close()


async def fake(case, handler, **options):
    server = await FakeServer(handler, **options).start()
    case.addAsyncCleanup(server.stop)
    return server


def answer(status=200, payload=None, headers=()):
    """A handler that always answers ``status`` (a chat completion when 200)."""
    async def handler(fake, request, writer):
        writer.write(http_response(status, chat_payload() if payload is None else payload, headers))
        return True
    return handler


def after(count, first, then):
    """A handler that behaves like ``first`` for ``count`` POSTs, then like ``then``."""
    async def handler(fake, request, writer):
        return await (first if len(fake.posts) <= count else then)(fake, request, writer)
    return handler


async def stall(fake, request, writer):
    await fake.stopping.wait()


async def close_at_once(fake, request, writer):
    return False


async def drop_second_on_each_connection(fake, request, writer):
    """Answers, but drops the second request of every connection unanswered, as a server does
    that closes an idle keep-alive connection just as the client reuses it."""
    fake.seen[writer] = fake.seen.get(writer, 0) + 1
    if fake.seen[writer] == 2:
        return False
    writer.write(http_response(200, chat_payload()))
    return True


async def reset_mid_body(fake, request, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"id":' * 20)
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)
    return False


async def garbage(fake, request, writer):
    writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\r\n")
    return True


async def oversize_head(fake, request, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (a.MAX_HEADER_BYTES + 1000) + b"\r\nContent-Length: 2\r\n\r\n{}")
    return True


async def too_many_headers(fake, request, writer):
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(a.MAX_HEADER_COUNT + 5))
    writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 2\r\n\r\n{}")
    return True


async def huge_length(fake, request, writer):
    """Declares a terabyte, sends a little, then waits: the client must not try to read it."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
                 + b" " * 65536)
    await writer.drain()
    await fake.stopping.wait()


async def endless_chunked(fake, request, writer):
    """Streams 64 KiB chunks (SSE comments) until the client goes away; counts them in ``sent``."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b": " + b"x" * 65000 + b"\n\n"
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    while not writer.is_closing():
        writer.write(chunk)
        fake.sent += len(piece)
        await writer.drain()
    return False


def sse_chunks(*contents, done=True):
    events = [json.dumps({"choices": [{"index": 0, "delta": {"content": c}}]}) for c in contents]
    data = b"".join(b"data: %s\n\n" % e.encode() for e in events) + (b"data: [DONE]\n\n" if done else b"")
    return b"%x\r\n%s\r\n" % (len(data), data)


async def sse_reply(fake, request, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + sse_chunks("fake", " reply") + b"0\r\n\r\n")
    return True


async def sse_then_reset(fake, request, writer):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + sse_chunks("fake", done=False))
    await writer.drain()
    await asyncio.sleep(0.1)
    reset(writer)
    return False


async def sse_then_stall(fake, request, writer):
    """One event, then silence until the client hangs up."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + sse_chunks("fake", done=False))
    await writer.drain()
    await request.reader.read()
    return False


def raw(data, keep=True):
    """A handler that writes ``data`` as it is."""
    async def handler(fake, request, writer):
        writer.write(data)
        return keep
    return handler


async def endless_until_eof(fake, request, writer):
    """No length, no chunking: the body ends at EOF, which never comes."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    piece = b" " * 65536
    while not writer.is_closing():
        writer.write(piece)
        fake.sent += len(piece)
        await writer.drain()
    return False




# =============================================================================================
# The trainer's run-api
# =============================================================================================


class TrainerAPIStub:
    """Atropos' ``run-api`` with its real schemas, driven by the test (a thread, any host/port).

    ``GET /wandb_info`` -> ``{"group", "project"}``, both null until ``register``;
    ``GET /status`` -> ``{"current_step", "queue_size"}``, the step reading 0 until registered;
    ``GET /status-env`` -> what ``BaseEnv.get_status`` reads, with ``env_weight``.
    ``go_away`` stops listening (connections are refused), ``come_back`` listens again on the
    same port, ``garbage`` (True for ``GARBAGE``, or a list like it) makes every answer a different
    kind of nonsense: (status, content type, body), or raw bytes sent as they are.  ``hits`` counts
    requests per path; ``status_calls`` logs (time, client address) of each ``/status``.
    """

    GARBAGE = [(200, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
               (200, "application/json", b"[1, 2, 3]"),
               (200, "application/json", b'{"current_step": "seven", "project": 7}'),
               (500, "application/json", b'{"detail": "Internal Server Error"}')]

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.project = self.group = None  # type: Optional[str]
        self.step = 0
        self.env_weight = 1.0
        self.garbage = False
        self.hits = collections.Counter()  # type: collections.Counter
        self.status_calls = []  # type: List[tuple]
        self.cond = threading.Condition()
        self._server = None  # type: Optional[http.server.ThreadingHTTPServer]
        self.come_back()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _answer(self, path: str, client: str):
        with self.cond:
            self.hits[path] += 1
            if path == "/status":
                self.status_calls.append((time.time(), client))
            if self.garbage:
                answers = self.garbage if isinstance(self.garbage, list) else self.GARBAGE
                answer = answers[self.hits["garbage"] % len(answers)]
                self.hits["garbage"] += 1
                self.cond.notify_all()
                return answer
            elif path == "/wandb_info":
                status, ctype = 200, "application/json"
                body = json.dumps({"group": self.group, "project": self.project}).encode()
            elif path == "/status":
                status, ctype = 200, "application/json"
                step = self.step if self.project is not None else 0
                body = json.dumps({"current_step": step, "queue_size": 0}).encode()
            elif path == "/status-env":
                status, ctype = 200, "application/json"
                body = json.dumps({"current_step": self.step, "queue_size": 0, "unallocated_fraction": 1.0,
                                   "self_queue_size": 0, "max_group_size": 1, "env_weight": self.env_weight}).encode()
            else:
                status, ctype, body = 404, "application/json", b'{"detail": "Not Found"}'
            self.cond.notify_all()
        return status, ctype, body

    def come_back(self) -> None:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                answer = api._answer(self.path.split("?", 1)[0], self.client_address[0])
                if isinstance(answer, bytes):
                    self.close_connection = True
                    self.wfile.write(answer)
                    return
                status, ctype, body = answer
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def go_away(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def register(self, project: str, group: Optional[str], step: int) -> None:
        with self.cond:
            self.project, self.group, self.step = project, group, step

    def set(self, **fields: Any) -> None:
        with self.cond:
            for name, value in fields.items():
                setattr(self, name, value)

    def advance_step(self) -> int:
        """The trainer took a batch: one step on."""
        with self.cond:
            self.step += 1
            return self.step

    def status_calls_since(self, since: float, address: str) -> int:
        """How many ``/status`` requests ``address`` made since the time ``since``."""
        with self.cond:
            return sum(1 for t, client in self.status_calls if t >= since and client == address)

    def wait_hits(self, path: str, more: int, timeout: float = 10.0) -> None:
        """Wait until ``path`` got ``more`` further requests: then a whole round saw the change."""
        with self.cond:
            target = self.hits[path] + more
            if not self.cond.wait_for(lambda: self.hits[path] >= target, timeout):
                raise AssertionError(f"the watcher did not call {path} {more} more times within {timeout} s")


# =============================================================================================
# Counting scontrol
# =============================================================================================


@contextlib.contextmanager
def counting_scontrol(directory: str):
    """``scontrol`` on ``PATH`` counting its runs (``len(runs())``), each passed on to the real
    one (or, without Slurm's client, expanded with ``expand_hostlist``)."""
    log_path, real = os.path.join(directory, "scontrol-runs"), shutil.which("scontrol")
    script = os.path.join(directory, "scontrol")
    fallback = (f'exec "{real}" "$@"' if real else
                f'exec "{sys.executable}" -c "import sys; sys.path.insert(0, {ROOT!r}); import atropos_slurm as a; '
                'print(chr(10).join(a.expand_hostlist(sys.argv[-1])))" "$@"')
    with open(script, "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> "{log_path}"\n{fallback}\n')
    os.chmod(script, 0o755)
    open(log_path, "w").close()

    def runs() -> List[str]:
        with open(log_path) as f:
            return f.read().splitlines()
    with mock.patch.dict(os.environ, {"PATH": directory + os.pathsep + os.environ.get("PATH", "")}):
        yield runs
