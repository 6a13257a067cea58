#!/usr/bin/env python3
"""MAIN_CMD of the end-to-end Slurm test (tests/test_e2e_slurm.py): runs on the training node.

It plays the user's training program inside a real ``sbatch/atropos-rl.sbatch`` job:

1. serves a stand-in of the Atropos trainer API (``run-api``) on ``0.0.0.0:$TRAINER_API_PORT``:
   ``GET /wandb_info`` -> ``{"group", "project"}`` (both null until "registered", a second or
   so after start), ``GET /status`` -> ``{"current_step", "queue_size"}``; it remembers which
   address called ``/status`` when, which tells it when each watcher has finished a round;
2. builds ``ServerManager(configs=ServerBaseline(...), slurm=True)`` and reports what
   discovery found;
3. sends requests in three phases.  The job runs one stub server with ``--die-after``
   (``STUB_DIE_AFTER`` of the job script), which dies during phase B; phase C runs with it
   gone.  Between phases it waits for every watcher to log a round, and it advances the step;
4. reads every stub's ``GET /stub/stats`` and the manager's ``stats()``.

Everything the test checks is printed as one JSON object per line, prefixed ``E2E `` (see
``emit``).  Exit status 0 when every request returned, else 1.  Standard library only.

Environment: ``TRAINER_API_PORT`` (8000), ``E2E_VICTIM`` (``node:port`` of the server that dies,
to check it), ``E2E_PHASE_REQUESTS`` (80), ``E2E_TIMEOUT`` (60 s, bound of every wait), and what
the job script exports for discovery (``NUM_TRAINING_NODES``, ``INFER_TP``, ...).
"""

import asyncio
import json
import os
import socket
import sys
import time
import urllib.request

from atropos_slurm import AtroposSlurmError, ServerBaseline, ServerManager, discover_servers
from support import TrainerAPIStub

PORT = int(os.environ.get("TRAINER_API_PORT", "8000"))
PHASE_REQUESTS = int(os.environ.get("E2E_PHASE_REQUESTS", "80"))
TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "60"))
VICTIM = os.environ.get("E2E_VICTIM", "")


def emit(event, **fields):
    """One machine-readable marker line: ``E2E {"event": ..., ...}``."""
    print("E2E " + json.dumps(dict(event=event, time=round(time.time(), 3), **fields), sort_keys=True), flush=True)


def get_json(url, timeout=3.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# ------------------------------------------------------------------------- the program --

def lab_gpu_map():
    """{"node:port": CUDA_VISIBLE_DEVICES} of every stub server process, read from /proc.

    Only possible in the one-machine lab (tests/slurm_lab), where all "nodes" share one PID
    namespace: it shows what the server processes really got, after Slurm set its own value.
    """
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            # the server itself, not the srun that started it (on this node, same argv tail)
            if os.path.basename(argv[0]) == b"srun" or b"stub-server" not in argv or b"--port" not in argv:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID", b"").decode() != os.environ.get("SLURM_JOB_ID"):
            continue
        port = argv[argv.index(b"--port") + 1].decode()
        node = env.get(b"SLURMD_NODENAME", b"?").decode()
        found[f"{node}:{port}"] = env.get(b"CUDA_VISIBLE_DEVICES", b"").decode()
    return found


async def wait_until(predicate, what, timeout=TIMEOUT, interval=0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def main():
    started = time.monotonic()
    api = TrainerAPIStub("0.0.0.0", PORT)
    emit("api", host=socket.gethostname(), port=PORT)

    # The trainer registers a moment later; until then /wandb_info is null/null, as run-api.
    info = get_json(f"http://127.0.0.1:{PORT}/wandb_info")
    emit("wandb_info_before_register", info=info)

    found = discover_servers()
    mgr = ServerManager(configs=ServerBaseline(timeout=10, num_max_requests_at_once=16, model_name="stub"),
                        slurm=True, retry_backoff=0.05, health_probe_interval=0.5, no_server_timeout=20)
    urls = [s.url for s in mgr.servers]
    emit("discovery", hostname=socket.gethostname(), urls=urls, nodes=list(found.nodes),
         training_nodes=list(found.training_nodes), inference_nodes=list(found.inference_nodes),
         servers_per_node=found.layout.servers_per_node, tp=found.layout.tp, gpus_per_node=found.layout.gpus_per_node,
         gpus_from=found.layout.gpus_from, het_group=found.het_group, nodes_per_server=found.layout.nodes_per_server)
    emit("gpu_map", servers=lab_gpu_map())
    # one watcher per serving node: every inference node, or each spanning server's first node
    heads = found.inference_nodes[::found.layout.nodes_per_server]
    watcher_addrs = {socket.gethostbyname(node): node for node in heads}

    await asyncio.sleep(1.5)
    api.register(project="atropos-slurm-e2e", group=f"e2e-{os.environ.get('SLURM_JOB_ID', 'local')}", step=1)
    emit("registered", info=get_json(f"http://127.0.0.1:{PORT}/wandb_info"), step=api.step)

    sent = returned = 0
    failures = []

    async def phase(name, count):
        nonlocal sent
        t0 = time.monotonic()

        async def one(i):
            nonlocal returned
            try:
                resp = await mgr.chat_completion(messages=[{"role": "user", "content": f"{name} {i}"}], max_tokens=4)
                assert resp.choices[0].message.content.startswith("stub reply"), resp
                returned += 1
            except (AtroposSlurmError, AssertionError) as e:
                failures.append(f"{name} {i}: {e}")

        sent += count
        await asyncio.gather(*(one(i) for i in range(count)))
        emit("phase", name=name, sent=count, total_sent=sent, total_returned=returned, failures=len(failures),
             seconds=round(time.monotonic() - t0, 3), step=api.step)

    async def watcher_rounds(since, rounds, why):
        """Until every watcher asked /status ``rounds`` times since ``since``: each such call
        starts a round, so the round before the last one has been probed and logged."""
        await wait_until(lambda: all(api.status_calls_since(since, a) >= rounds for a in watcher_addrs),
                         f"{rounds} watcher rounds ({why}) from {sorted(watcher_addrs.values())}")
        emit("watchers_seen", why=why, rounds=rounds, nodes=sorted(watcher_addrs.values()))

    def stub_stats():
        out = {}
        for url in urls:
            try:
                out[url] = get_json(url[: -len("/v1")] + "/stub/stats", timeout=2)
            except OSError as e:
                out[url] = {"error": str(e)}
        return out

    # Phase A: every server answers; the watchers log a round with all of them healthy.
    await phase("A", PHASE_REQUESTS)
    emit("stub_stats", when="after_A", stats=stub_stats())
    await watcher_rounds(time.time(), 2, "all healthy")
    emit("step", step=api.advance_step())

    # Phase B: the --die-after server dies part way; its requests must go elsewhere.
    await phase("B", PHASE_REQUESTS)
    rows = {r["url"]: r for r in mgr.stats()}
    down = [u for u, r in rows.items() if not r["healthy"]]
    emit("manager_down_after_B", down=down)
    if VICTIM:
        victim_url = "http://%s/v1" % VICTIM

        def victim_gone():
            try:
                get_json(victim_url[: -len("/v1")] + "/health", timeout=1)
                return False
            except OSError:
                return True

        await wait_until(victim_gone, f"{VICTIM} to stop answering")
        emit("victim_gone", url=victim_url)
        await watcher_rounds(time.time(), 2, "after the death")
    emit("step", step=api.advance_step())

    # Phase C: the dead server is skipped from the start.
    before_c = {r["url"]: r["done"] for r in mgr.stats()}
    await phase("C", PHASE_REQUESTS // 2)
    emit("step", step=api.advance_step())
    rows = mgr.stats()
    emit("manager_stats", rows=rows, done_in_C={r["url"]: r["done"] - before_c[r["url"]] for r in rows})
    emit("stub_stats", when="end", stats=stub_stats())
    await mgr.close()
    ok = not failures and returned == sent
    emit("done", ok=ok, sent=sent, returned=returned, lost=sent - returned, failures=failures[:10],
         seconds=round(time.monotonic() - started, 3))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
