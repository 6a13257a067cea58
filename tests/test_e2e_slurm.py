"""End to end on a real Slurm cluster: sbatch/atropos-rl.sbatch with stub servers.

The lab (tests/slurm_lab/up.sh) is a real 3-node Slurm cluster on this machine: every node a
slurmd in its own network + UTS namespace, with 8 fake GPUs each, typed (``h100``) so that
Slurm writes typed GPU counts.  It is brought up once for this file.  The tests submit the
job scripts themselves (not copies) with ``sbatch --wait``.  First ``atropos-rl.sbatch``:

    INFER_ENGINE=stub NUM_TRAINING_NODES=1 INFER_TP=2 GPUS_PER_NODE=8  ->  node1 trains,
    node2 and node3 run 4 stub servers each (ports 9000-9003), one watcher each,
    MAIN_CMD = tests/e2e_main.py on node1 (trainer API stand-in + ServerManager(slurm=True)),
    STUB_DIE_AFTER=node3:9001:15  ->  that server dies part way through the requests,

and checks the job output: discovery, the wait, the GPU groups, requests on every server,
the watchers' health lines, the death detected and no request lost.  Then the heterogeneous
variant, ``atropos-rl-het.sbatch``, with its components given on the command line:

    sbatch --nodes=1 --gpus-per-node=h100:1 : --nodes=2 --gpus-per-node=h100:4
    INFER_TP=2, no NUM_TRAINING_NODES, no GPUS_PER_NODE  ->  node1 (component 0) trains,
    node2 and node3 (component 1: Slurm writes 'h100:4') run 2 servers each.

Last ``atropos-rl.sbatch`` with ``INFER_TP=16`` on the 8-GPU nodes and an ``INFER_CMD``: one
server spans node2 and node3, its command runs on both ({node_rank} 0 and 1), it listens on
node2, one watcher runs there, and the main command finds that one server.

(A node of two GPU types breaks untyped --gpus-per-node steps in Slurm 22.05: "Step requested
gres_per_node=gpu:8 is more than the job's gres_per_node=gpu:4"; the several-types form,
``h100:2,a100:2``, is checked in test_atropos_slurm.py with the variables 22.05 wrote.)

Needs root and the Debian packages slurmctld slurmd slurm-client munge; otherwise it skips
(or fails, when ``ATROPOS_TEST_REQUIRE`` names ``slurm-lab`` or ``all``, as in CI).
Run it with:  sudo python -m pytest tests/test_e2e_slurm.py -v   (about 15 s)
"""

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from support import require  # noqa: E402
REPO = os.path.dirname(HERE)
LAB = os.path.join(HERE, "slurm_lab")
JOB_SCRIPT = os.path.join(REPO, "sbatch", "atropos-rl.sbatch")
HET_JOB_SCRIPT = os.path.join(REPO, "sbatch", "atropos-rl-het.sbatch")
DRIVER = os.path.join(HERE, "e2e_main.py")
LOCK = "/run/lock/atropos-slurm-lab.lock"  # one lab per machine: serialise concurrent runs

NODES = ["node1", "node2", "node3"]
TP, GPUS_PER_NODE, BASE_PORT = 2, 8, 9000
PER_NODE = GPUS_PER_NODE // TP
VICTIM_NODE, VICTIM_PORT, DIE_AFTER = "node3", 9001, 15
VICTIM_URL = f"http://{VICTIM_NODE}:{VICTIM_PORT}/v1"
PHASE_REQUESTS = 80  # phases A and B; C sends half: 200 requests in all
JOB_TIMEOUT = 90  # seconds; the job takes about 10
JOB_SETTINGS = {"INFER_ENGINE", "MODEL", "INFER_CMD", "INFER_EXTRA_ARGS", "INFER_HOST", "INFER_TP", "INFER_PP",
                "GPUS_PER_NODE", "BASE_PORT", "NUM_TRAINING_NODES", "TRAINER_API_PORT", "MAIN_CMD", "WAIT_TIMEOUT",
                "MIN_HEALTHY", "HEALTH_PATH", "PYTHON", "ATROPOS_DIR", "WATCHER_SCRIPT", "WATCHER_ARGS",
                "SERVER_LOG_DIR", "STUB_DIE_AFTER", "CLEANUP_TIMEOUT",
                "ATROPOS_JOB_SCRIPT"}  # every variable sbatch/atropos-rl.sbatch and atropos-rl-het.sbatch read
LAB_GPU_TYPES = "h100"  # tests/slurm_lab/up.sh: its 8 GPUs per node are h100s
HET_TP, HET_GPUS = 2, 4  # component 1: --gpus-per-node=h100:4


def _missing_requirements():
    if not sys.platform.startswith("linux"):
        return "needs Linux (network and UTS namespaces)"
    if os.geteuid() != 0:
        return "needs root (it builds a Slurm cluster in network namespaces)"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "munge",
                           "unmunge", "ip", "unshare", "nsenter")
               if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return ("missing " + ", ".join(missing)
                + " (apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)")
    return None


SKIP_REASON = _missing_requirements()
HOW_TO_RUN = "run as root with the slurm packages installed: sudo python -m pytest tests/test_e2e_slurm.py"


def _run(argv, timeout, env_extra=None):
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin", **(env_extra or {}))
    return subprocess.run(argv, timeout=timeout, capture_output=True, text=True, env=env)


def markers(text):
    """The driver's ``E2E {...}`` lines, parsed."""
    return [json.loads(line[4:]) for line in text.splitlines() if line.startswith("E2E {")]


def watcher_records(text):
    """The watchers' JSON lines (run with --no-wandb): {"server/server_health_K_I": 0|1, ...}."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"node_num"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Lab:
    """The lab, up once for this file (setUpModule), down at its end; one lab per machine (a lock)."""

    lock = None
    timings = {}

    @classmethod
    def up(cls):
        require("slurm-lab", SKIP_REASON is None, f"{SKIP_REASON}; {HOW_TO_RUN}")
        os.makedirs(os.path.dirname(LOCK), exist_ok=True)
        cls.lock = open(LOCK, "w")
        fcntl.flock(cls.lock, fcntl.LOCK_EX)
        try:
            _run(["bash", os.path.join(LAB, "down.sh")], timeout=120)  # a stale lab from a killed run
            t = time.monotonic()
            up = _run(["bash", os.path.join(LAB, "up.sh")], timeout=120,
                      env_extra={"SLURM_LAB_GPU_TYPES": LAB_GPU_TYPES})
            cls.timings["up"] = time.monotonic() - t
            if up.returncode != 0:
                raise AssertionError(f"up.sh failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        except BaseException:
            cls.down()
            raise

    @classmethod
    def down(cls):
        if cls.lock is None:
            return
        try:
            t = time.monotonic()
            down = _run(["bash", os.path.join(LAB, "down.sh")], timeout=120)
            sys.stderr.write(f"e2e timings: up {cls.timings.get('up', 0):.1f} s, down {time.monotonic() - t:.1f} s\n")
            if down.returncode != 0:
                sys.stderr.write(f"down.sh failed:\n{down.stdout}\n{down.stderr}\n")
        finally:
            fcntl.flock(cls.lock, fcntl.LOCK_UN)
            cls.lock.close()
            cls.lock = None


def setUpModule():
    Lab.up()


def tearDownModule():
    Lab.down()


def submit(script, settings, sbatch_args, tmp):
    """``sbatch --wait`` of ``script`` with ``settings`` alone (nothing of the caller's leaks in):
    (the CompletedProcess, the job's output, seconds)."""
    out = os.path.join(tmp, "job.out")
    job_env = {k: v for k, v in os.environ.items()
               if k not in JOB_SETTINGS and not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "ATROPOS_SLURM_", "E2E_"))}
    job_env.update(settings)
    job_env["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    t = time.monotonic()
    proc = subprocess.run(["sbatch", "--wait", f"--output={out}", f"--chdir={tmp}", "--time=00:05:00", *sbatch_args,
                           script], env=job_env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    seconds = time.monotonic() - t
    with open(out) as f:
        return proc, f.read(), seconds


def driver_settings(**more):
    """The job settings both tests share: stub servers, tests/e2e_main.py as MAIN_CMD."""
    settings = {
        "INFER_ENGINE": "stub", "TRAINER_API_PORT": "8000", "WAIT_TIMEOUT": "30", "PYTHON": sys.executable,
        "ATROPOS_DIR": REPO, "MAIN_CMD": shlex.join([sys.executable, DRIVER]),
        "WATCHER_ARGS": "--no-wandb --interval 1 --probe-timeout 2", "CLEANUP_TIMEOUT": "10",
        "E2E_PHASE_REQUESTS": str(PHASE_REQUESTS), "E2E_TIMEOUT": "40", "PYTHONUNBUFFERED": "1",
    }
    settings.update(more)
    return settings


class TestSlurmEndToEnd(unittest.TestCase):
    """One job, many assertions: each test method checks one aspect of the same run."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="atropos-e2e-")
        settings = driver_settings(NUM_TRAINING_NODES="1", INFER_TP=str(TP), GPUS_PER_NODE=str(GPUS_PER_NODE),
                                   BASE_PORT=str(BASE_PORT), STUB_DIE_AFTER=f"{VICTIM_NODE}:{VICTIM_PORT}:{DIE_AFTER}",
                                   E2E_VICTIM=f"{VICTIM_NODE}:{VICTIM_PORT}")
        cls.sbatch, cls.output, seconds = submit(JOB_SCRIPT, settings, [f"--nodes={len(NODES)}"], cls.tmp)
        cls.markers = markers(cls.output)
        cls.watch = watcher_records(cls.output)
        sys.stderr.write(f"\ne2e timings: sbatch --wait {seconds:.1f} s\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------

    def marker(self, event, **match):
        found = [m for m in self.markers if m["event"] == event and all(m.get(k) == v for k, v in match.items())]
        self.assertTrue(found, f"no E2E marker {event} {match or ''} in the job output:\n{self.output[-6000:]}")
        return found[-1]

    def expected_urls(self):
        return [f"http://{node}:{BASE_PORT + i}/v1" for node in NODES[1:] for i in range(PER_NODE)]

    # -- the job as a whole --------------------------------------------------------------------

    def test_job_succeeded(self):
        self.assertEqual(self.sbatch.returncode, 0,
                         f"sbatch --wait exit {self.sbatch.returncode}: {self.sbatch.stderr}\n{self.output[-6000:]}")
        done = self.marker("done")
        self.assertTrue(done["ok"], done)
        self.assertIn("atropos-rl: main command exited with status 0", self.output)

    def test_layout_printed_by_the_job_script(self):
        self.assertIn("training node(s) node1; inference node(s) node2 node3", self.output)
        self.assertIn(f"{PER_NODE} server(s) per inference node", self.output)

    # -- discovery and startup -----------------------------------------------------------------

    def test_discovery_found_exactly_the_inference_servers(self):
        d = self.marker("discovery")
        self.assertEqual(d["hostname"], "node1", "the main command must run on the training node")
        self.assertEqual(d["urls"], self.expected_urls())
        self.assertFalse([u for u in d["urls"] if "node1" in u], "a training-node URL was discovered")
        self.assertEqual(d["training_nodes"], ["node1"])
        self.assertEqual(d["inference_nodes"], ["node2", "node3"])
        self.assertEqual((d["servers_per_node"], d["tp"]), (PER_NODE, TP))

    def test_wait_saw_every_server_healthy(self):
        n = len(self.expected_urls())
        self.assertIn(f"wait: {n}/{n} servers healthy", self.output)
        self.assertIn(f"wait: ready ({n} of {n} required)", self.output)
        self.assertIn("atropos-rl: servers are up", self.output)

    def test_each_server_got_its_own_gpu_group(self):
        # Slurm sets CUDA_VISIBLE_DEVICES=0..7 in every step (the lab has 8 fake GPUs per
        # node); the job script must override it per server: server i gets i*TP .. i*TP+TP-1.
        got = self.marker("gpu_map")["servers"]
        want = {f"{node}:{BASE_PORT + i}": ",".join(str(g) for g in range(i * TP, i * TP + TP))
                for node in NODES[1:] for i in range(PER_NODE)}
        self.assertEqual(got, want)

    def test_trainer_api_registers_late(self):
        self.assertEqual(self.marker("wandb_info_before_register")["info"], {"group": None, "project": None})
        self.assertEqual(self.marker("registered")["info"]["project"], "atropos-slurm-e2e")

    # -- load balancing and failover -----------------------------------------------------------

    def test_requests_reached_every_server(self):
        stats = self.marker("stub_stats", when="after_A")["stats"]
        self.assertEqual(sorted(stats), sorted(self.expected_urls()))
        for url, s in stats.items():
            self.assertGreaterEqual(s.get("completed", 0), 1, f"{url} got no request: {s}")
        self.assertEqual(sum(s["completed"] for s in stats.values()), PHASE_REQUESTS)

    def test_no_request_lost_when_a_server_died(self):
        done = self.marker("done")
        total = 2 * PHASE_REQUESTS + PHASE_REQUESTS // 2
        self.assertEqual((done["sent"], done["returned"], done["lost"]), (total, total, 0), done)
        for name in ("A", "B", "C"):
            self.assertEqual(self.marker("phase", name=name)["failures"], 0)

    def test_the_dead_server_was_detected_and_avoided(self):
        self.assertIn(VICTIM_URL, self.marker("manager_down_after_B")["down"])
        self.marker("victim_gone", url=VICTIM_URL)
        rows = {r["url"]: r for r in self.marker("manager_stats")["rows"]}
        self.assertFalse(rows[VICTIM_URL]["healthy"], rows[VICTIM_URL])
        self.assertGreaterEqual(rows[VICTIM_URL]["failed"], 1, rows[VICTIM_URL])
        self.assertLessEqual(rows[VICTIM_URL]["done"], DIE_AFTER)
        others = [u for u in self.expected_urls() if u != VICTIM_URL]
        self.assertTrue(all(rows[u]["healthy"] for u in others), rows)
        done_in_c = self.marker("manager_stats")["done_in_C"]
        self.assertEqual(done_in_c[VICTIM_URL], 0, "phase C still used the dead server")
        self.assertTrue(all(done_in_c[u] >= 1 for u in others), done_in_c)
        self.assertEqual(sum(r["done"] for r in rows.values()), self.marker("done")["returned"])
        end = self.marker("stub_stats", when="end")["stats"]
        self.assertIn("error", end[VICTIM_URL])
        self.assertTrue(all("completed" in end[u] for u in others), end)
        # the server step ended on its own (exit 1 of stub-server --die-after)
        self.assertRegex(self.output, r"srun: error: node3: task 0: Exited with exit code 1")

    # -- watchers ------------------------------------------------------------------------------

    def test_watchers_logged_every_server(self):
        for k in range(len(NODES) - 1):
            mine = [r for r in self.watch if r.get("node_num") == k]
            self.assertTrue(mine, f"no JSON line from the watcher of inference node {k}")
            for i in range(PER_NODE):
                key = f"server/server_health_{k}_{i}"
                self.assertIn(1, [r.get(key) for r in mine], f"{key} never logged healthy")

    def test_watcher_logged_the_dead_server_down(self):
        k, i = NODES.index(VICTIM_NODE) - 1, VICTIM_PORT - BASE_PORT
        key = f"server/server_health_{k}_{i}"
        values = [r[key] for r in self.watch if r.get("node_num") == k and key in r]
        self.assertIn(1, values, f"{key}: never healthy")
        self.assertIn(0, values, f"{key}: the death was never logged")
        self.assertEqual(values[values.index(0):], [0] * (len(values) - values.index(0)), f"{key}: came back? {values}")
        # the other servers of that node stayed healthy in the rounds after the death
        last = [r for r in self.watch if r.get("node_num") == k][-1]
        self.assertEqual([last[f"server/server_health_{k}_{j}"] for j in range(PER_NODE)],
                         [0 if j == i else 1 for j in range(PER_NODE)], last)

    def test_watchers_followed_the_trainer_step(self):
        for k in range(len(NODES) - 1):
            steps = [r.get("trainer_step") for r in self.watch if r.get("node_num") == k]
            self.assertTrue(steps and max(steps) >= 2, f"watcher {k} never saw the step advance: {steps}")
            self.assertEqual(steps, sorted(steps), f"watcher {k}: the step went backwards: {steps}")

    # -- cleanup -------------------------------------------------------------------------------

    def test_background_steps_were_stopped(self):
        self.assertRegex(self.output, r"atropos-rl: stopping \d+ background step\(s\)")
        self.assertNotIn("ignored SIGTERM", self.output)



class TestHeterogeneousJob(unittest.TestCase):
    """sbatch/atropos-rl-het.sbatch: the trainer in component 0, the servers in component 1."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="atropos-e2e-het-")
        cls.sbatch, cls.output, seconds = submit(
            HET_JOB_SCRIPT, driver_settings(INFER_TP=str(HET_TP)),
            ["--nodes=1", "--gpus-per-node=h100:1", ":", "--nodes=2", "--gpus-per-node=h100:4"], cls.tmp)
        cls.markers = markers(cls.output)
        cls.watch = watcher_records(cls.output)
        sys.stderr.write(f"\ne2e timings: heterogeneous sbatch --wait {seconds:.1f} s\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def marker(self, event, **match):
        return TestSlurmEndToEnd.marker(self, event, **match)

    def expected_urls(self):
        return [f"http://{node}:{BASE_PORT + i}/v1" for node in NODES[1:] for i in range(HET_GPUS // HET_TP)]

    def test_job_succeeded_and_no_request_lost(self):
        self.assertEqual(self.sbatch.returncode, 0,
                         f"sbatch --wait exit {self.sbatch.returncode}: {self.sbatch.stderr}\n{self.output[-6000:]}")
        done = self.marker("done")
        self.assertTrue(done["ok"], done)
        self.assertEqual(done["lost"], 0, done)

    def test_layout_from_the_inference_component(self):
        self.assertIn("training node(s) node1; inference node(s) node2 node3 (heterogeneous job, component 1)",
                      self.output)
        # Slurm wrote the component's GPUs as 'h100:4': 4 per node, 2 servers of TP 2.
        self.assertIn("discover: GPUs per node: 4, from SLURM_GPUS_PER_NODE_HET_GROUP_1", self.output)
        self.assertIn("2 server(s) per inference node (4 GPUs per node / INFER_TP=2 x INFER_PP=1)", self.output)

    def test_main_discovered_the_inference_components_servers(self):
        d = self.marker("discovery")
        self.assertEqual(d["hostname"], "node1", "the main command must run in the training component")
        self.assertEqual((d["het_group"], d["gpus_per_node"], d["gpus_from"]),
                         (1, HET_GPUS, "SLURM_GPUS_PER_NODE_HET_GROUP_1"))
        self.assertEqual((d["training_nodes"], d["inference_nodes"]), (["node1"], ["node2", "node3"]))
        self.assertEqual(d["urls"], self.expected_urls())

    def test_servers_ran_in_the_inference_component_on_their_gpus(self):
        got = self.marker("gpu_map")["servers"]
        self.assertEqual(got, {f"{node}:{BASE_PORT + i}": f"{i * HET_TP},{i * HET_TP + 1}"
                               for node in NODES[1:] for i in range(HET_GPUS // HET_TP)})

    def test_requests_reached_every_server_and_watchers_logged_them(self):
        stats = self.marker("stub_stats", when="after_A")["stats"]
        self.assertEqual(sorted(stats), sorted(self.expected_urls()))
        self.assertTrue(all(s.get("completed", 0) >= 1 for s in stats.values()), stats)
        for k in range(len(NODES) - 1):
            mine = [r for r in self.watch if r.get("node_num") == k]
            for i in range(HET_GPUS // HET_TP):
                self.assertIn(1, [r.get(f"server/server_health_{k}_{i}") for r in mine], (k, i, mine[-3:]))


class TestServersSpanningNodes(unittest.TestCase):
    """atropos-rl.sbatch with INFER_TP=16 on 8-GPU nodes: one server on node2 + node3, listening on node2."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="atropos-e2e-span-")
        # INFER_CMD runs on every node of the group; the stub's --model shows the placeholders it got.
        cmd = ("{python} -m atropos_slurm stub-server --host {host} --port {port} "
               "--model rank{node_rank}-of-{nnodes}-{head}")
        cls.sbatch, cls.output, seconds = submit(
            JOB_SCRIPT, driver_settings(NUM_TRAINING_NODES="1", INFER_TP="16", INFER_CMD=cmd),
            [f"--nodes={len(NODES)}"], cls.tmp)
        cls.markers = markers(cls.output)
        cls.watch = watcher_records(cls.output)
        sys.stderr.write(f"\ne2e timings: spanning sbatch --wait {seconds:.1f} s\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def marker(self, event, **match):
        return TestSlurmEndToEnd.marker(self, event, **match)

    def test_job_succeeded_and_no_request_lost(self):
        self.assertEqual(self.sbatch.returncode, 0,
                         f"sbatch --wait exit {self.sbatch.returncode}: {self.sbatch.stderr}\n{self.output[-6000:]}")
        self.assertEqual(self.marker("done")["lost"], 0)

    def test_one_server_on_the_groups_first_node(self):
        self.assertIn("each server spans 2 nodes (INFER_TP=16 x INFER_PP=1 on 8 GPUs per node) and listens on the "
                      "first, port 9000; 1 in all", self.output)
        d = self.marker("discovery")
        self.assertEqual((d["urls"], d["nodes_per_server"]), (["http://node2:9000/v1"], 2))
        stats = self.marker("stub_stats", when="after_A")["stats"]
        self.assertEqual(stats["http://node2:9000/v1"]["completed"], PHASE_REQUESTS)

    def test_command_ran_on_every_node_of_the_group_with_all_its_gpus(self):
        for node, rank in (("node2", 0), ("node3", 1)):
            self.assertRegex(self.output, rf"atropos-rl: server {node}:9000 \(inference node {rank}, GPUs "
                                          rf"0,1,2,3,4,5,6,7, rank {rank} of 2\): .* --model rank{rank}-of-2-node2\n")

    def test_one_watcher_on_the_first_node(self):
        self.assertIn("atropos-rl: watcher on node2 (node_num 0)", self.output)
        self.assertNotIn("watcher on node3", self.output)
        self.assertIn(1, [r.get("server/server_health_0_0") for r in self.watch if r.get("node_num") == 0])

if __name__ == "__main__":
    unittest.main()
