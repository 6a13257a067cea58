"""End-to-end tests of the inference-node watcher (``inference_watcher.py``, ``atropos_slurm watch``).

Everything is real except the trainer: the watcher runs as a subprocess, probes stub inference
servers (``StubServer``), a hung server and a closed port over loopback, reads a stand-in for
the trainer's ``run-api`` that the tests drive (register, step, go away, garbage), and logs to
the real ``wandb`` package in offline mode.  The W&B assertions read the run's ``.wandb`` file
back after the watcher exited: that file is the only copy of an offline run's data, and a run
that was not finished loses its last row and has no exit record.

Run with ``python -m pytest tests/test_watcher.py`` or ``python -m unittest discover -s tests``.
Without wandb the W&B tests are skipped, or fail when ``ATROPOS_TEST_REQUIRE`` names ``wandb``
or ``all`` (CI).
"""

import asyncio
import collections
import glob
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import LoopThread, TrainerAPIStub, closed_port, require, reserve_ports  # noqa: E402

import atropos_slurm  # noqa: E402

WATCHER = os.path.join(ROOT, "inference_watcher.py")
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
PROBE_TIMEOUT = 0.5
INTERVAL = 0.3
WANDB_INIT_TIMEOUT = 60.0  # wandb.init starts the wandb-core service: slow on a loaded CI machine


# ---------------------------------------------------------------------------------------------
# Reading an offline run back: the .wandb transaction log
# ---------------------------------------------------------------------------------------------

LOG_BLOCK = 32 * 1024
LOG_CHUNK_HEADER = 7  # crc32 (4, little endian), length (2), chunk type (1)
LOG_FULL, LOG_FIRST, LOG_MIDDLE, LOG_LAST = 1, 2, 3, 4


def read_wandb_log(path: str) -> List[Any]:
    """The ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then
    32 KiB blocks counted from the start of the file (the header sits in block 0).  Each block
    holds chunks: crc32 of (type byte + payload), payload length, type (full, first, middle,
    last), payload; a record larger than the rest of a block continues in the next blocks, and
    a block tail shorter than a chunk header is zero padding.  wandb no longer ships a Python
    reader (``wandb.sdk.internal.datastore`` is gone), hence this one.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _version = struct.unpack_from("<4sHB", data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise AssertionError(f"{path}: not a .wandb log (header {data[:7]!r})")
    records, pending, pos = [], None, LOG_CHUNK_HEADER
    while True:
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < LOG_CHUNK_HEADER:
            pos += left
        if pos + LOG_CHUNK_HEADER > len(data):
            break
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # a zero-filled block tail
            pos += left
            continue
        payload = data[pos + LOG_CHUNK_HEADER:pos + LOG_CHUNK_HEADER + length]
        if len(payload) != length:
            raise AssertionError(f"{path}: truncated chunk at offset {pos}")
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise AssertionError(f"{path}: bad checksum at offset {pos}")
        pos += LOG_CHUNK_HEADER + length
        if kind == LOG_FULL:
            records.append(payload)
        elif kind == LOG_FIRST:
            pending = payload
        elif kind == LOG_MIDDLE and pending is not None:
            pending += payload
        elif kind == LOG_LAST and pending is not None:
            records.append(pending + payload)
            pending = None
        else:
            raise AssertionError(f"{path}: unexpected chunk type {kind} at offset {pos}")
    return [wandb_internal_pb2.Record.FromString(r) for r in records]


def _item_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


class OfflineRun:
    """What a finished offline run holds: run info, config, metric definitions, history, exit."""

    def __init__(self, path: str):
        self.path = path
        records = read_wandb_log(path)
        runs = [r.run for r in records if r.HasField("run")]
        if not runs:
            raise AssertionError(f"{path}: no run record")
        self.run = runs[0]
        self.config = {}
        for update in [self.run.config.update] + [r.config.update for r in records if r.HasField("config")]:
            for item in update:
                self.config[_item_key(item)] = json.loads(item.value_json)
        self.metrics = [r.metric for r in records if r.HasField("metric")]
        self.rows = [{_item_key(i): _item_value(i) for i in r.history.item} for r in records if r.HasField("history")]
        self.exits = [r.exit for r in records if r.HasField("exit")]


def offline_runs(wandb_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")))


# ---------------------------------------------------------------------------------------------
# The world around the watcher: trainer API, inference servers, ports
# ---------------------------------------------------------------------------------------------


class HungServer:
    """Accepts connections and never answers, like a wedged inference server; counts accepts.

    The watcher opens one fresh connection per round, so ``accepted`` counts its rounds.
    """

    def __init__(self, sock: socket.socket):
        self.sock, self.accepted, self._held = sock, 0, []  # type: socket.socket, int, List[socket.socket]
        self.cond = threading.Condition()
        sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self._held.append(conn)
                self.accepted += 1
                self.cond.notify_all()

    def wait_rounds(self, more: int, timeout: float) -> None:
        with self.cond:
            target = self.accepted + more
            if not self.cond.wait_for(lambda: self.accepted >= target, timeout):
                raise AssertionError(f"only {self.accepted - target + more} of {more} rounds within {timeout} s: "
                                     "a hung server is blocking the watcher")

    def close(self) -> None:
        self.sock.close()
        with self.cond:
            for conn in self._held:
                conn.close()


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (Linux ``/proc``): what Slurm's process tracking signals."""
    children = collections.defaultdict(list)  # type: Dict[int, List[int]]
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        kids = children[todo.pop()]
        found += kids
        todo += kids
    return found


# ---------------------------------------------------------------------------------------------
# The watcher process
# ---------------------------------------------------------------------------------------------


class WatcherProcess:
    """The watcher (or any command) as a subprocess; stdout and stderr lines collected as they come."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str], cwd: str):
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.out, self.err = [], []  # type: List[str], List[str]
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: List[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def _wait(self, lines: List[str], what: str, predicate, count: int, timeout: float) -> List[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in list(lines) if predicate(line)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.1)  # let the readers drain
                raise AssertionError(f"waited for {count} x {what}; exit code {self.proc.poll()}\n{self.dump()}")
            time.sleep(0.02)

    def wait_err(self, text: str, count: int = 1, timeout: float = 10.0) -> List[str]:
        return self._wait(self.err, f"stderr {text!r}", lambda line: text in line, count, timeout)

    def wait_out(self, count: int, timeout: float = 10.0, predicate=lambda line: True) -> List[str]:
        return self._wait(self.out, "stdout lines", predicate, count, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.finish(timeout)

    def finish(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the watcher did not exit within {timeout} s\n{self.dump()}") from None
        for reader in self._readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill it if it still runs, let the readers drain, close the pipes (a test's cleanup)."""
        self.kill()
        for reader in self._readers:
            reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def count_err(self, text: str) -> int:
        return sum(text in line for line in self.err)

    def dump(self) -> str:
        return ("--- command: " + " ".join(self.argv) + "\n--- stdout:\n" + "\n".join(self.out)
                + "\n--- stderr:\n" + "\n".join(self.err))


class WatcherTestCase(unittest.TestCase):
    """A temp dir per test that wandb writes to, and the environment the watcher runs in."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="atropos-watcher-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        for sub in ("cache", "config", "data", "tmp"):
            os.mkdir(os.path.join(self.tmp, sub))

    def env(self, shadow_dir: Optional[str] = None) -> Dict[str, str]:
        """The test's environment minus W&B settings and proxies, wandb offline inside ``self.tmp``.

        ``shadow_dir`` is put first on PYTHONPATH, to replace wandb with a module of the test's.
        """
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("WANDB_", "SLURM_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                              "all_proxy", "no_proxy")}
        env.update(WANDB_MODE="offline", WANDB_DIR=self.tmp, WANDB_CACHE_DIR=os.path.join(self.tmp, "cache"),
                   WANDB_CONFIG_DIR=os.path.join(self.tmp, "config"), WANDB_DATA_DIR=os.path.join(self.tmp, "data"),
                   TMPDIR=os.path.join(self.tmp, "tmp"), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                   SLURM_JOB_ID="4242")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shadow_dir, ROOT, os.environ.get("PYTHONPATH")) if p)
        return env

    def shadow_wandb(self, source: str) -> str:
        """A directory holding a ``wandb.py`` with ``source``, to put first on PYTHONPATH."""
        path = tempfile.mkdtemp(dir=self.tmp, prefix="shadow-")
        with open(os.path.join(path, "wandb.py"), "w") as f:
            f.write(source)
        return path

    def watcher(self, args: Sequence[str], env: Optional[Dict[str, str]] = None,
                module: bool = False) -> WatcherProcess:
        prefix = [sys.executable, "-m", "atropos_slurm", "watch"] if module else [sys.executable, WATCHER]
        proc = WatcherProcess(prefix + list(args), env or self.env(), self.tmp)
        self.addCleanup(proc.close)
        return proc

    def api(self) -> TrainerAPIStub:
        api = TrainerAPIStub()
        self.addCleanup(api.go_away)
        return api

    def stubs(self) -> LoopThread:
        loop = LoopThread().__enter__()
        self.addCleanup(loop.__exit__)
        return loop

    def one_stub(self) -> int:
        """One stub server on a free port; its port."""
        socks = self.ports(1)
        base = socks[0].getsockname()[1]
        socks[0].close()
        self.stubs().start_stub(base)
        return base

    def two_stubs(self):
        """Two stub servers on consecutive free ports: (the first port, their LoopThread)."""
        socks = self.ports(2)
        base = socks[0].getsockname()[1]
        for sock in socks:
            sock.close()
        stubs = self.stubs()
        stubs.start_stub(base)
        stubs.start_stub(base + 1)
        return base, stubs

    def ports(self, count: int) -> List[socket.socket]:
        socks = reserve_ports(count)
        for sock in socks:
            self.addCleanup(sock.close)
        return socks

    @staticmethod
    def args(api_addr: str, node_num: int, gpus: int, tp: int, base_port: int, *more: str) -> List[str]:
        return ["--api_addr", api_addr, "--node_num", str(node_num), "--gpus-per-node", str(gpus), "--tp", str(tp),
                "--base-port", str(base_port), "--host", "127.0.0.1", "--interval", str(INTERVAL),
                "--probe-timeout", str(PROBE_TIMEOUT)] + list(more)

    def assertNoTraceback(self, proc: WatcherProcess) -> None:
        self.assertFalse([line for line in proc.err if "Traceback" in line], proc.dump())


def collapse(values: Sequence[Any]) -> List[Any]:
    """Runs of equal values collapsed to one: [3, 3, 5, 5, 2] -> [3, 5, 2]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def health_keys(node: int, count: int, word: str = "server_health") -> List[str]:
    return [f"server/{word}_{node}_{i}" for i in range(count)]


# ---------------------------------------------------------------------------------------------
# W&B: the real package, offline, read back from the .wandb file
# ---------------------------------------------------------------------------------------------


class WandbEndToEndTest(WatcherTestCase):

    def setUp(self):
        require("wandb", HAVE_WANDB, "pip install wandb")
        super().setUp()

    def test_a_whole_training_run(self):
        """Unregistered trainer, registration, steps, API outage, a dead server, garbage, a
        trainer restart, then SIGTERM: the run holds every round, matching what happened."""
        node, socks = 3, self.ports(4)  # 8 GPUs at TP 2: four servers
        base = socks[0].getsockname()[1]
        h = health_keys(node, 4)
        socks[0].close()
        socks[1].close()
        stubs = self.stubs()
        generating = stubs.start_stub(base)  # answers /health_generate (SGLang)
        stubs.start_stub(base + 1, health_generate=False)  # 404 on /health_generate (vLLM): falls back to /health
        hung = HungServer(socks[2])  # accepts, never answers
        self.addCleanup(hung.close)
        # socks[3] stays bound without listening: connection refused
        api = self.api()
        proc = self.watcher(self.args(api.url, node, 8, 2, base))

        # Not registered yet: progress on stderr, no W&B run.
        proc.wait_err("waiting for the trainer to register", count=2)
        self.assertEqual(offline_runs(self.tmp), [])
        self.assertTrue(all("/4 servers healthy" in line
                            for line in proc.err if "waiting for the trainer to register" in line))

        api.register("atropos-test", "grpo-run-7", step=3)
        proc.wait_err("logging to W&B project 'atropos-test' group 'grpo-run-7' as run inf_node_3",
                      timeout=WANDB_INIT_TIMEOUT)
        api.wait_hits("/status", 2)
        api.set(step=5)
        api.wait_hits("/status", 2)

        # The trainer API goes away: rounds go on (the hung server counts them), one message.
        outage_start = len(proc.err)
        api.go_away()
        hung.wait_rounds(3, timeout=3 * (INTERVAL + PROBE_TIMEOUT) + 5)
        outage = proc.err[outage_start:]
        api.set(step=7)
        api.come_back()
        api.wait_hits("/status", 2)
        proc.wait_err("is back")
        self.assertEqual(sum("trainer API unavailable" in line for line in outage), 1, proc.dump())

        stubs.stop_stub(generating)  # server 0 dies
        api.wait_hits("/status", 2)
        api.set(garbage=True)
        api.wait_hits("/status", len(TrainerAPIStub.GARBAGE))
        api.set(garbage=False, step=2)  # the trainer restarted from an earlier checkpoint
        api.wait_hits("/status", 2)

        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("has no /health_generate (404)"), 1, proc.dump())
        # Said once per outage (the refused connections, then the garbage), not once per round.
        self.assertEqual(proc.count_err("trainer API unavailable"), 2, proc.dump())
        self.assertEqual(proc.count_err("is back"), 2, proc.dump())
        self.assertEqual(proc.count_err("wandb.log failed"), 0, proc.dump())
        self.assertEqual(proc.count_err("wandb.finish failed"), 0, proc.dump())

        paths = offline_runs(self.tmp)
        self.assertEqual(len(paths), 1, paths)
        run = OfflineRun(paths[0])
        self.assertEqual(run.run.display_name, "inf_node_3")
        self.assertEqual(run.run.project, "atropos-test")
        self.assertEqual(run.run.run_group, "grpo-run-7")
        self.assertEqual(run.run.job_type, "inference_watcher")
        for key, value in {"node_num": 3, "tp": 2, "gpus_per_node": 8, "base_port": base, "host": "127.0.0.1",
                           "ports": [base, base + 1, base + 2, base + 3], "api_addr": api.url,
                           "health_path": "/health_generate", "slurm_job_id": "4242"}.items():
            self.assertEqual(run.config.get(key), value, key)
        self.assertTrue(any(m.glob_name == "server/*" and m.step_metric == "trainer_step" for m in run.metrics))
        self.assertEqual(len(run.exits), 1, "the run was not finished")
        self.assertEqual(run.exits[0].exit_code, 0)

        rows = run.rows
        rounds = [row["round"] for row in rows]
        # No row dropped, the trainer's step going back included: W&B's own step stays 0, 1, 2, ...
        self.assertEqual([row["_step"] for row in rows], list(range(len(rows))))
        self.assertEqual(rounds, list(range(rounds[0], rounds[0] + len(rows))))
        self.assertGreaterEqual(rounds[0], 3, "W&B logging started before the trainer registered")
        self.assertGreaterEqual(hung.accepted, rounds[-1], "a round without a probe of the hung server")
        steps = [row["trainer_step"] for row in rows]
        self.assertIn(collapse(steps), ([3, 5, 7, 2], [0, 3, 5, 7, 2]), steps)
        self.assertGreaterEqual(steps.count(5), 4, "rounds missing while the trainer API was away")
        self.assertEqual(steps[-1], 2, "the last row was lost: the run was not finished")
        for row in rows:
            self.assertEqual([row[k] for k in h[1:]], [1, 0, 0], row)
            self.assertEqual(row[f"server/healthy_servers_{node}"], sum(row[k] for k in h), row)
        first = [row[h[0]] for row in rows]
        self.assertEqual(first, sorted(first, reverse=True), "server 0 came back from the dead")
        self.assertTrue(all(row[h[0]] == 1 for row in rows if row["trainer_step"] in (3, 5)))
        self.assertTrue(all(row[h[0]] == 0 for row in rows if row["trainer_step"] == 2))

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
    def test_slurm_stop_signals_the_wandb_service_too(self):
        """Slurm ends a step by signalling every process in it: wandb-core dies with the watcher
        and loses what it had not written yet (15 s of rows by default, the whole run here).
        The watcher has it write every round, so the rows before the signal are in the file."""
        base = self.one_stub()
        api = self.api()
        api.register("atropos-test", "g", step=1)
        proc = self.watcher(self.args(api.url, 5, 1, 1, base))
        proc.wait_err("logging to W&B project", timeout=WANDB_INIT_TIMEOUT)
        api.wait_hits("/status", 6)
        tree = descendants(proc.proc.pid)
        self.assertTrue(tree, "wandb started no service process")
        for pid in [proc.proc.pid] + tree:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.assertEqual(proc.finish(), 0, proc.dump())
        run = OfflineRun(offline_runs(self.tmp)[0])
        rounds = [row["round"] for row in run.rows]
        self.assertGreaterEqual(len(rounds), 3, proc.dump())
        self.assertEqual(rounds, list(range(rounds[0], rounds[0] + len(rounds))))

    def test_never_registered_and_api_down_at_start(self):
        """No W&B run while the trainer is unknown; an API down at start, or answering garbage,
        is waited for (garbage is no registration)."""
        base = self.one_stub()
        api = self.api()
        api.go_away()
        proc = self.watcher(self.args(api.url, 0, 1, 1, base))
        proc.wait_err("waiting for the trainer to register", count=2)
        api.come_back()
        api.wait_hits("/wandb_info", 2)
        api.set(garbage=True)
        api.wait_hits("/wandb_info", len(TrainerAPIStub.GARBAGE))
        api.set(garbage=False)
        api.wait_hits("/wandb_info", 2)
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("trainer API unavailable"), 2, proc.dump())
        self.assertEqual(proc.count_err("is back"), 2, proc.dump())
        self.assertTrue(any("1/1 servers healthy; waiting for the trainer" in line for line in proc.err))
        self.assertEqual(offline_runs(self.tmp), [])
        self.assertEqual(proc.out, [])

    def test_once_via_python_m_atropos_slurm_watch(self):
        """The console-script form; ``--once`` still finishes the run with its one row."""
        base, stubs = self.two_stubs()
        api = self.api()
        api.register("atropos-test", None, step=12)
        proc = self.watcher(self.args(api.url, 1, 8, 4, base, "--once"), module=True)
        self.assertEqual(proc.finish(WANDB_INIT_TIMEOUT), 0, proc.dump())
        self.assertNoTraceback(proc)
        paths = offline_runs(self.tmp)
        self.assertEqual(len(paths), 1, paths)
        run = OfflineRun(paths[0])
        self.assertEqual((run.run.display_name, run.run.project, run.run.run_group), ("inf_node_1", "atropos-test", ""))
        self.assertEqual(len(run.exits), 1)
        self.assertEqual(len(run.rows), 1)
        row = run.rows[0]
        self.assertEqual([row[k] for k in health_keys(1, 2)], [1, 1])
        self.assertEqual((row["server/healthy_servers_1"], row["trainer_step"], row["round"]), (2, 12, 1))


# ---------------------------------------------------------------------------------------------
# W&B failing: a stand-in wandb module whose init fails once and whose log always raises
# ---------------------------------------------------------------------------------------------

FAKE_WANDB = '''
"""A wandb stand-in: init fails the first time, Run.log always raises; calls go to $FAKE_WANDB_CALLS."""
import json, os

_inits = 0


def _note(**call):
    with open(os.environ["FAKE_WANDB_CALLS"], "a") as f:
        f.write(json.dumps(call) + "\\n")


class Run:
    def define_metric(self, *args, **kwargs):
        _note(call="define_metric", args=list(args), kwargs=kwargs)

    def log(self, data, *args, **kwargs):
        _note(call="log", data=data)
        raise RuntimeError("fake wandb: log exploded")

    def finish(self, *args, **kwargs):
        _note(call="finish")


def init(**kwargs):
    global _inits
    _inits += 1
    _note(call="init", kwargs=kwargs)
    if _inits == 1:
        raise RuntimeError("fake wandb: init failed")
    return Run()
'''


class WandbFailureTest(WatcherTestCase):

    def test_wandb_errors_are_logged_and_the_loop_goes_on_then_sigint_finishes(self):
        base, stubs = self.two_stubs()
        api = self.api()
        api.register("", "grp", step=40)  # an empty project is still a registration
        env = self.env(self.shadow_wandb(FAKE_WANDB))
        env["FAKE_WANDB_CALLS"] = calls_path = os.path.join(self.tmp, "calls.jsonl")
        proc = self.watcher(self.args(api.url, 2, 2, 1, base), env)
        proc.wait_err("wandb.log failed", count=3)
        self.assertEqual(proc.stop(signal.SIGINT), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("wandb.init failed: fake wandb: init failed (will retry next round)"), 1,
                         proc.dump())
        with open(calls_path) as f:
            calls = [json.loads(line) for line in f]
        names = [c["call"] for c in calls]
        self.assertEqual(names[:2], ["init", "init"])
        self.assertEqual(names[-1], "finish")
        self.assertEqual(names.count("finish"), 1)
        self.assertGreaterEqual(names.count("log"), 3)
        init = calls[1]["kwargs"]
        self.assertEqual({k: init.get(k) for k in ("project", "group", "name", "job_type")},
                         {"project": None, "group": "grp", "name": "inf_node_2", "job_type": "inference_watcher"})
        self.assertNotIn("reinit", init)  # deprecated as a bool in wandb 0.19+; one run per process needs none
        self.assertEqual(init["config"]["ports"], [base, base + 1])
        self.assertIn({"call": "define_metric", "args": ["server/*"], "kwargs": {"step_metric": "trainer_step"}}, calls)
        logs = [c["data"] for c in calls if c["call"] == "log"]
        self.assertEqual([d["round"] for d in logs], list(range(2, 2 + len(logs))))
        self.assertEqual(logs[0], {"server/server_health_2_0": 1, "server/server_health_2_1": 1,
                                   "server/healthy_servers_2": 2, "trainer_step": 40, "round": 2})


# ---------------------------------------------------------------------------------------------
# wandb that never returns: an unreachable W&B server (real wandb), a run.log that hangs
# ---------------------------------------------------------------------------------------------

HANGING_WANDB = '''
"""A wandb stand-in whose Run.log never returns (a W&B server gone away mid-run); calls go to $FAKE_WANDB_CALLS."""
import json, os, threading


def _note(**call):
    with open(os.environ["FAKE_WANDB_CALLS"], "a") as f:
        f.write(json.dumps(call) + "\\n")


class Run:
    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data, *args, **kwargs):
        _note(call="log", data=data)
        threading.Event().wait()

    def finish(self, *args, **kwargs):
        _note(call="finish")


def init(**kwargs):
    _note(call="init")
    return Run()
'''


class WandbNeverReturnsTest(WatcherTestCase):

    def test_an_unreachable_wandb_server_neither_stops_probing_nor_delays_sigterm(self):
        """Issue 10 item 7, with the real wandb online against a closed loopback port: its
        ``wandb.init`` retries for 90 s.  The rounds go on meanwhile, and SIGTERM ends the
        watcher at once (with no run to finish), not after wandb gives up."""
        require("wandb", HAVE_WANDB, "pip install wandb")
        base = self.one_stub()
        api = self.api()
        api.register("atropos-test", "g", step=3)
        env = self.env()
        env.update(WANDB_MODE="online", WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_API_KEY="0" * 40,
                   WANDB_ERROR_REPORTING="false")
        proc = self.watcher(self.args(api.url, 0, 1, 1, base), env)
        api.wait_hits("/wandb_info", 1, timeout=30)
        api.wait_hits("/status", 6, timeout=30)  # rounds go on while wandb.init hangs
        self.assertEqual(proc.stop(signal.SIGTERM, timeout=10), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("wandb.init has not returned: exiting without a W&B run"), 1, proc.dump())

    def test_a_wandb_log_that_never_returns_does_not_stop_probing_or_hold_sigterm_long(self):
        """Issue 10 item 7: rows wait behind a stuck ``run.log`` while probing goes on; SIGTERM
        waits at most WANDB_FINISH_TIMEOUT for wandb, then the process exits 0 regardless."""
        base = self.one_stub()
        api = self.api()
        api.register("atropos-test", "g", step=3)
        env = self.env(self.shadow_wandb(HANGING_WANDB))
        env["FAKE_WANDB_CALLS"] = calls_path = os.path.join(self.tmp, "calls.jsonl")
        proc = self.watcher(self.args(api.url, 0, 1, 1, base), env)
        proc.wait_err("logging to W&B project 'atropos-test' group 'g' as run inf_node_0")
        api.wait_hits("/status", 6)
        self.assertEqual(proc.stop(signal.SIGTERM, timeout=atropos_slurm.WANDB_FINISH_TIMEOUT + 10), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("wandb has not finished the run within 10 s: exiting without it"), 1,
                         proc.dump())
        with open(calls_path) as f:
            self.assertEqual([json.loads(line)["call"] for line in f], ["init", "log"])


# ---------------------------------------------------------------------------------------------
# JSON lines: --no-wandb, or wandb not importable
# ---------------------------------------------------------------------------------------------

NO_WANDB = 'raise ImportError("wandb is hidden by the test")\n'


class JsonLinesTest(WatcherTestCase):

    def test_no_wandb_flag_with_cli_stub_servers(self):
        """``--no-wandb``: one record per round on stdout; the 404 fallback said once per server."""
        socks = self.ports(2)
        base = socks[0].getsockname()[1]
        for sock in socks:
            sock.close()
        stub = WatcherProcess([sys.executable, "-m", "atropos_slurm", "stub-server", "--port", str(base),
                               "--count", "2", "--no-health-generate"], self.env(), self.tmp)
        self.addCleanup(stub.close)
        stub.wait_err("stub-server: listening")
        api = self.api()
        api.register("proj", "grp", step=11)
        proc = self.watcher(self.args(api.url, 0, 8, 4, base, "--no-wandb"))
        proc.wait_out(2)
        api.set(step=12)
        proc.wait_out(1, predicate=lambda line: '"trainer_step": 12' in line)
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.dump())
        self.assertEqual(stub.stop(signal.SIGTERM), 0, stub.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("--no-wandb: writing the health records to stdout as JSON lines"), 1)
        self.assertEqual(proc.count_err("has no /health_generate (404): probing /health instead"), 2, proc.dump())
        records = [json.loads(line) for line in proc.out]
        self.assertEqual([r["round"] for r in records], list(range(1, len(records) + 1)))
        for r in records:
            self.assertEqual(set(r), {"server/server_health_0_0", "server/server_health_0_1",
                                      "server/healthy_servers_0", "trainer_step", "round", "node_num", "time"})
            self.assertEqual((r["server/server_health_0_0"], r["server/server_health_0_1"],
                              r["server/healthy_servers_0"], r["node_num"]), (1, 1, 2, 0), r)
        self.assertEqual(collapse([r["trainer_step"] for r in records]), [11, 12])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "wandb")), "--no-wandb still started wandb")

    def test_wandb_not_importable_once_exit_codes_and_legacy_names(self):
        env = self.env(self.shadow_wandb(NO_WANDB))
        socks = self.ports(3)
        base = socks[0].getsockname()[1]
        socks[0].close()
        socks[1].close()
        stubs = self.stubs()
        stubs.start_stub(base)
        stubs.start_stub(base + 1)  # base + 2: bound, not listening
        api = self.api()
        api.register("proj", None, step=5)

        healthy = self.watcher(self.args(api.url, 4, 4, 2, base, "--once"), env)
        self.assertEqual(healthy.finish(), 0, healthy.dump())
        self.assertEqual(healthy.count_err("wandb is not installed: writing the health records to stdout"), 1)
        self.assertEqual(len(healthy.out), 1, healthy.dump())
        self.assertEqual({k: v for k, v in json.loads(healthy.out[0]).items() if k != "time"},
                         {"server/server_health_4_0": 1, "server/server_health_4_1": 1,
                          "server/healthy_servers_4": 2, "trainer_step": 5, "round": 1, "node_num": 4})

        # One server down, the trainer API down too: exit 1, still one record.
        unhealthy = self.watcher(self.args(f"http://127.0.0.1:{closed_port()}", 4, 3, 1, base, "--once",
                                           "--legacy-metric-names"), env)
        self.assertEqual(unhealthy.finish(), 1, unhealthy.dump())
        self.assertNoTraceback(healthy)
        self.assertNoTraceback(unhealthy)
        self.assertEqual(len(unhealthy.out), 1, unhealthy.dump())
        record = json.loads(unhealthy.out[0])
        self.assertEqual([record.get(k) for k in health_keys(4, 3, "server_heath")], [1, 1, 0], record)
        self.assertFalse([k for k in record if "server_health_" in k], record)
        self.assertEqual((record["server/healthy_servers_4"], record["trainer_step"]), (2, 0))


# ---------------------------------------------------------------------------------------------
# Cluster shapes: the defaults follow the allocation; servers spanning nodes
# ---------------------------------------------------------------------------------------------


class ClusterShapesTest(WatcherTestCase):
    def test_het_job_gpus_default_to_the_inference_components(self):
        """In a heterogeneous job's step, the GPUs per node are the inference component's (as Slurm 22.05 sets them)."""
        env = self.env(self.shadow_wandb(NO_WANDB))
        env.update(SLURM_HET_SIZE="2", SLURM_GPUS_PER_NODE_HET_GROUP_0="8", SLURM_GPUS_PER_NODE_HET_GROUP_1="h100:2",
                   SLURM_JOB_NODELIST_HET_GROUP_0="node1", SLURM_JOB_NODELIST_HET_GROUP_1="node[2-3]")
        base, _ = self.two_stubs()
        api = self.api()
        args = ["--api_addr", api.url, "--node_num", "1", "--base-port", str(base), "--host", "127.0.0.1",
                "--probe-timeout", str(PROBE_TIMEOUT), "--once"]
        proc = self.watcher(args, env)
        self.assertEqual(proc.finish(), 0, proc.dump())
        record = json.loads(proc.out[0])
        self.assertEqual((record["server/healthy_servers_1"], sorted(k for k in record if "server_health" in k)),
                         (2, health_keys(1, 2)), record)

    def test_spanning_server_watched_from_its_first_node_only(self):
        env = self.env(self.shadow_wandb(NO_WANDB))
        base = self.one_stub()
        api = self.api()
        common = ["--api_addr", api.url, "--tp", "8", "--pp", "2", "--gpus-per-node", "4", "--base-port", str(base),
                  "--host", "127.0.0.1", "--probe-timeout", str(PROBE_TIMEOUT), "--once"]
        head = self.watcher(common + ["--node_num", "4"], env)  # nodes 4-7 run one server, on node 4
        self.assertEqual(head.finish(), 0, head.dump())
        self.assertEqual(json.loads(head.out[0])["server/server_health_4_0"], 1)
        other = self.watcher(common + ["--node_num", "6"], env)
        self.assertEqual(other.finish(), 0, other.dump())
        self.assertEqual(other.out, [])
        other.wait_err("inference node 6 serves nothing itself: each server spans 4 nodes and listens on the first of "
                       "its group; the watcher of inference node 4 watches it. Nothing to do here.")

    def test_console_script_names_itself(self):
        proc = subprocess.run([sys.executable, WATCHER, "--help"], capture_output=True, text=True, timeout=60,
                              env=self.env())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(proc.stdout.startswith("usage: inference-node-wandb-watcher "), proc.stdout)


# ---------------------------------------------------------------------------------------------
# The trainer API answering anything, or trickling
# ---------------------------------------------------------------------------------------------


class TricklingServer:
    """Reads a request, then sends an answer one byte every ``pause`` s (at most ``limit`` bytes):
    each read is quick, the answer never ends.  A fault no real server produces on demand."""

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"

    def __init__(self, pause: float = 0.05, limit: int = 4000):
        self.pause, self.limit = pause, limit
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                answer = self.HEAD + b'{"current_step": 1, "pad": "' + b"x" * self.limit
                for i in range(min(self.limit, len(answer))):
                    if self.closed.wait(self.pause):
                        return
                    conn.sendall(answer[i:i + 1])
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


# Answers no trainer should give (``TrainerAPIStub.garbage``): (status, content type, body) or raw bytes.
HOSTILE = [(200, "application/json", b"[" * 100000),  # nested past the JSON parser's depth
           (200, "application/json", b'{"current_step": 5, "queue_size": ' + b'{"a": ' * 100000 + b"1"
            + b"}" * 100000 + b"}"),  # 5,000 levels parse on 3.13
           (200, "application/json", b'{"current_step": 1e400, "project": "p", "group": "g"}'),
           (200, "application/json", b'{"current_step": NaN, "project": ["p"], "group": {"g": 1}}'),
           (200, "application/json", b'{"current_step": true, "project": true, "group": null}'),
           (200, "application/json", b'{"current_step": -3}'),
           (200, "application/json", b'{"current_step": ' + b"7" * 5000 + b"}"),  # over int()'s 4,300 digits
           (200, "application/json", b'{"current_step": 18446744073709551616}'),
           (200, "application/json", b"\xff\xfe{}"),
           (200, "application/json", b""),
           b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\n{}",
           b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"Content-Length: 2\r\n\r\n{}",
           b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"current_step": 1',  # shorter than it says
           b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}",
           b"SSH-2.0-OpenSSH_9.6\r\n"]


class HostileTrainerTest(WatcherTestCase):

    def test_any_trainer_answer_is_survived_and_logged_once_per_outage(self):
        """Issue 10 item 6: JSON nested past the parser's depth, wrong types, NaN, a step of
        5,000 digits, a header line of 70 KB, a body cut short, a status of 600, not HTTP at
        all: the watcher goes on with the last step it knew, says so once, and once when the
        trainer is back."""
        base = self.one_stub()
        api = self.api()
        api.register("proj", None, step=4)
        proc = self.watcher(self.args(api.url, 0, 1, 1, base, "--no-wandb"))
        proc.wait_out(2)
        api.set(garbage=HOSTILE)
        api.wait_hits("/status", len(HOSTILE) + 1, timeout=60)
        api.set(garbage=False, step=6)
        proc.wait_out(1, predicate=lambda line: '"trainer_step": 6' in line)
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("trainer API unavailable"), 1, proc.dump())
        self.assertEqual(proc.count_err("is back"), 1, proc.dump())
        records = [json.loads(line) for line in proc.out]
        self.assertEqual([r["round"] for r in records], list(range(1, len(records) + 1)))
        self.assertEqual(collapse([r["trainer_step"] for r in records]), [4, 6])
        self.assertGreater(len(records), len(HOSTILE))
        self.assertTrue(all(r["server/healthy_servers_0"] == 1 for r in records))

    def test_a_trickling_trainer_api_is_bounded_by_the_probe_timeout_in_total(self):
        """Issue 10 item 8: a trainer API sending one byte every 50 ms never trips a per-read
        timeout of 0.5 s; the whole call is bounded instead, so rounds keep coming."""
        base = self.one_stub()
        trickler = TricklingServer()
        self.addCleanup(trickler.close)
        proc = self.watcher(self.args(f"http://127.0.0.1:{trickler.port}", 0, 1, 1, base, "--no-wandb"))
        proc.wait_out(4, timeout=4 * (INTERVAL + 2 * PROBE_TIMEOUT) + 10)
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.dump())
        self.assertNoTraceback(proc)
        self.assertEqual(proc.count_err("trainer API unavailable"), 1, proc.dump())
        self.assertEqual(proc.count_err(f"no whole answer within {PROBE_TIMEOUT:g} s"), 1, proc.dump())


# ---------------------------------------------------------------------------------------------
# The watcher's parts in-process: log levels, the interval waited on the stop event
# ---------------------------------------------------------------------------------------------


class WatcherPartsTest(unittest.TestCase):

    def test_an_outage_is_a_warning_and_the_recovery_is_info(self):
        """Issue 9 item 4: good news at INFO, trouble at WARNING, each once."""
        api = TrainerAPIStub()
        self.addCleanup(api.go_away)
        api.register("proj", None, step=3)
        trainer = atropos_slurm.TrainerAPI(api.url, PROBE_TIMEOUT)
        with self.assertLogs(atropos_slurm.log, "INFO") as logs:
            self.assertEqual(asyncio.run(trainer.current_step()), 3)
            api.go_away()
            self.assertIsNone(asyncio.run(trainer.current_step()))
            self.assertIsNone(asyncio.run(trainer.current_step()))
            api.come_back()
            self.assertEqual(asyncio.run(trainer.current_step()), 3)
        self.assertEqual([(r.levelname, r.getMessage().split(": ")[0]) for r in logs.records],
                         [("WARNING", "trainer API unavailable"), ("INFO", f"trainer API at {api.url} is back")])

    def test_the_interval_is_waited_on_the_stop_event(self):
        """Issue 9 item 5: with an hour between rounds, setting ``stop`` ends the watcher at once
        (the JSON-lines sink, the same path as W&B)."""
        port = closed_port()
        options = atropos_slurm.WatcherOptions(api_addr=f"http://127.0.0.1:{port}", node_num=2, ports=[port],
                                               host="127.0.0.1", interval=3600, probe_timeout=PROBE_TIMEOUT)
        out = io.StringIO()

        async def main() -> bool:
            stop = asyncio.Event()
            api = atropos_slurm.TrainerAPI(options.api_addr, options.probe_timeout)
            task = asyncio.ensure_future(atropos_slurm.watch(options, stop, api,
                                                             atropos_slurm.JsonLinesSink(options.node_num, out)))
            for _ in range(500):
                if out.getvalue() or task.done():
                    break
                await asyncio.sleep(0.02)
            stop.set()
            return await asyncio.wait_for(task, 30)

        with self.assertLogs(atropos_slurm.log, "WARNING"):
            self.assertFalse(asyncio.run(main()))
        (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((record["round"], record["server/healthy_servers_2"], record["node_num"]), (1, 0, 2))


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


class BadArgumentsTest(WatcherTestCase):

    def test_bad_arguments_exit_2_with_one_line(self):
        api = "http://127.0.0.1:8000"
        cases = [
            (["--api_addr", api, "--node_num", "0", "--tp", "0"], "--tp"),
            (["--api_addr", api, "--node_num", "0", "--tp", "12", "--gpus-per-node", "8"],
             "more than a node's 8 (--gpus-per-node)"),
            (["--api_addr", api, "--node_num", "0", "--tp", "two"], "not an integer"),
            (["--api_addr", "notaurl", "--node_num", "0"], "--api_addr"),
            (["--api_addr", "http://trainer:99999", "--node_num", "0"], "--api_addr"),
            (["--api_addr", api, "--node_num", "-1"], "--node_num"),
            (["--api_addr", api], "--node_num"),
            (["--api_addr", api, "--node_num", "0", "--interval", "0"], "--interval"),
            # issue 10 items 11-13 and 18: values that cannot be sent, non-finite numbers, hosts
            (["--api_addr", api, "--node_num", "0", "--interval", "nan"], "--interval"),
            (["--api_addr", api, "--node_num", "0", "--interval", "inf"], "--interval"),
            (["--api_addr", api, "--node_num", "0", "--probe-timeout", "1e999"], "--probe-timeout"),
            (["--api_addr", api, "--node_num", "٣"], "--node_num"),
            (["--api_addr", api, "--node_num", "0", "--health-path", "/health\r\nX-Injected: 1"], "--health-path"),
            (["--api_addr", api, "--node_num", "0", "--health-path", "/héalth"], "--health-path"),
            (["--api_addr", api, "--node_num", "0", "--host", "a b"], "--host"),
            (["--api_addr", api, "--node_num", "0", "--host", ""], "--host"),
            (["--api_addr", api, "--node_num", "0", "--host", "h\r\nX: 1"], "--host"),
            (["--api_addr", "http://user:s3cr3t@trainer:8000", "--node_num", "0"], "--api_addr"),
        ]
        procs = [(self.watcher(args), args, expected) for args, expected in cases]
        procs.append((self.watcher(["--api_addr", api, "--node_num", "0", "--tp", "0"], module=True),
                      ["-m atropos_slurm watch --tp 0"], "--tp"))
        for proc, args, expected in procs:
            with self.subTest(args=" ".join(args)):
                self.assertEqual(proc.finish(), 2, proc.dump())
                self.assertEqual(proc.out, [], proc.dump())
                self.assertEqual(len(proc.err), 1, proc.dump())
                self.assertRegex(proc.err[0], r"^(inference-node-wandb-watcher|atropos-slurm): error: ")
                self.assertIn(expected, proc.err[0])
                self.assertNotIn("s3cr3t", proc.err[0])


class ProxyTest(WatcherTestCase):

    def test_trainer_api_is_not_sent_through_http_proxy(self):
        """Clusters often set ``http_proxy`` for pip and W&B; the trainer is on the job's own
        network, so the watcher must reach it directly."""
        base = self.one_stub()
        api = self.api()
        api.register("proj", None, step=9)
        env = self.env()
        env["http_proxy"] = env["HTTP_PROXY"] = f"http://127.0.0.1:{closed_port()}"
        proc = self.watcher(self.args(api.url, 0, 1, 1, base, "--once", "--no-wandb"), env)
        self.assertEqual(proc.finish(), 0, proc.dump())
        self.assertEqual(json.loads(proc.out[0])["trainer_step"], 9, proc.dump())


if __name__ == "__main__":
    unittest.main()
