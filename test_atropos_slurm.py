"""Tests of hostlists, discovery, config objects, packaging and the CLI.

Run: ``python -m pytest -q`` (all suites) or ``python -m unittest test_atropos_slurm``.
The differential test runs the real ``scontrol`` from Debian's slurm-client; without it the
test is skipped locally, and fails when ``ATROPOS_TEST_REQUIRE`` names ``scontrol`` (CI).
"""

import asyncio
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tests"))

import atropos_slurm as a  # noqa: E402
from atropos_slurm import APIServerConfig, ServerBaseline, ServerManager  # noqa: E402,F401  (seed imports)
from support import closed_port, require, run_cli, run_module  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Hostlists
# ----------------------------------------------------------------------------------------------

VALID_HOSTLISTS = [
    ("node1", ["node1"]),
    ("node[01-03],gpu-a[1-2]", ["node01", "node02", "node03", "gpu-a1", "gpu-a2"]),
    ("n[1-3,5,7-8]", ["n1", "n2", "n3", "n5", "n7", "n8"]),
    ("n[01-3]", ["n01", "n02", "n03"]),
    ("n[09-11]", ["n09", "n10", "n11"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[00-02]", ["n00", "n01", "n02"]),
    ("n[1-2],n[1-2]", ["n1", "n2", "n1", "n2"]),
    ("a b", ["a", "b"]),
    ("a\tb\nc", ["a", "b", "c"]),
    ("a,,b,", ["a", "b"]),
    ("  n1  ", ["n1"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("a[1-2]b[3-4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
    ("[1-2]", ["1", "2"]),
    ("1[1-2]", ["11", "12"]),
    ("n[1-3,2-4]", ["n1", "n2", "n3", "n2", "n3", "n4"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),  # suffix after ']': Slurm >= 23.02.5
    ("rack[1-2]-n[1-2].ib", ["rack1-n1.ib", "rack1-n2.ib", "rack2-n1.ib", "rack2-n2.ib"]),
    ("gpu-node-7.cluster.local", ["gpu-node-7.cluster.local"]),
]

INVALID_HOSTLISTS = [
    ("", "empty"),
    (" ,\t", "empty"),
    ("node[3-1]", "reversed range '3-1'"),
    ("node[1-", "unclosed '['"),
    ("node[1-2", "unclosed '['"),
    ("n[1", "unclosed '['"),
    ("n]1[", "']' without '['"),
    ("n[[1-2]]", "nested '['"),
    ("x[a-b]", "invalid range 'a-b'"),
    ("n[1-65537]", "more than 65536"),
    ("n[1-100000]", "more than 65536"),
    ("n[]", "invalid range ''"),
    ("n[1,]", "invalid range ''"),
    ("n[ 1-3]", "invalid range ' 1-3'"),
    ("n[+1-3]", "invalid range '+1-3'"),
    ("n[-1]", "invalid range '-1'"),
    ("-n1", "starts with '-'"),
    ("n1;touch X", "invalid character"),
    ("$(touch X)", "invalid character"),
    ("`touch X`", "invalid character"),
]


class HostlistTable(unittest.TestCase):
    def test_valid(self):
        for text, expected in VALID_HOSTLISTS:
            with self.subTest(text=text):
                self.assertEqual(a.expand_hostlist(text), expected)

    def test_invalid_quotes_the_bad_part(self):
        for text, fragment in INVALID_HOSTLISTS:
            with self.subTest(text=text):
                with self.assertRaises(a.HostlistError) as ctx:
                    a.expand_hostlist(text)
                self.assertIn(fragment, str(ctx.exception))
                self.assertNotIn("\n", str(ctx.exception))

    def test_range_cap_is_inclusive(self):
        self.assertEqual(len(a.expand_hostlist("n[1-65536]")), 65536)
        self.assertEqual(a.expand_hostlist("n[0-65535]")[-1], "n65535")

    def test_cartesian_product_is_bounded(self):
        with self.assertRaises(a.HostlistError):
            a.expand_hostlist("a[1-1000]b[1-1000]c[1-2]")

    def test_not_a_string(self):
        with self.assertRaises(a.HostlistError):
            a.expand_hostlist(None)


def random_valid_hostlist(rng: random.Random) -> str:
    """A hostlist in the grammar scontrol 22.05 accepts (no suffix after the last ']')."""
    def literal(allow_empty=True):
        alphabet = "abcxyz-.0123456789"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0 if allow_empty else 1, 6)))
        return text.lstrip("-")

    def ranges():
        parts = []
        for _ in range(rng.randint(1, 3)):
            width = rng.randint(1, 4)
            low = rng.randint(0, 10 ** min(width, 3) - 1)
            low_text = str(low).zfill(width)
            if rng.random() < 0.4:
                parts.append(low_text)
            else:
                parts.append(f"{low_text}-{low + rng.randint(0, 12)}")
        return ",".join(parts)

    tokens = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.25:
            token = literal(allow_empty=False) or "h"
        elif kind < 0.8:
            token = f"{literal() or 'n'}[{ranges()}]"
        else:
            groups = rng.randint(2, 3)
            token = (literal() or "r") + "".join(f"[{ranges()}]" + (literal() if g < groups - 1 else "")
                                                 for g in range(groups))
        if len(a.expand_hostlist(token)) > 400:
            token = "big"
        tokens.append(token)
        if rng.random() < 0.15:
            tokens.append(token)  # duplicates are kept
    separators = [",", " ", "\t", ", "]  # not newline: scontrol keeps it inside names (see below)
    return "".join(t + rng.choice(separators) for t in tokens[:-1]) + tokens[-1]


class DifferentialAgainstScontrol(unittest.TestCase):
    """Our expander against the real ``scontrol show hostnames`` (Debian slurm-client)."""

    @classmethod
    def setUpClass(cls):
        require("scontrol", shutil.which("scontrol") is not None,
                "install Debian's slurm-client (apt-get install slurm-client) to run the differential test")
        cls.tmp = tempfile.mkdtemp()
        cls.conf = os.path.join(cls.tmp, "slurm.conf")
        with open(cls.conf, "w") as f:
            f.write("ClusterName=x\nSlurmctldHost=localhost\n")  # enough for show hostnames, no controller
        cls.env = mock.patch.dict(os.environ, {"SLURM_CONF": cls.conf})
        cls.env.start()

    @classmethod
    def tearDownClass(cls):
        cls.env.stop()
        shutil.rmtree(cls.tmp)

    def scontrol(self, text):
        proc = subprocess.run(["scontrol", "show", "hostnames", "--", text], capture_output=True, text=True,
                              timeout=30)
        return proc.stdout.split(), proc.stderr.strip()

    def test_thousands_of_generated_lists_agree(self):
        rng = random.Random(20261128)
        lists = [random_valid_hostlist(rng) for _ in range(3000)]
        mismatches = []
        # 20 lists per scontrol call (a top-level comma concatenates expansions), then
        # the first 200 one by one so list boundaries are exercised too.
        for i in range(0, len(lists), 20):
            batch = ",".join(lists[i:i + 20])
            ours = a.expand_hostlist(batch)
            theirs, err = self.scontrol(batch)
            if ours != theirs or err:
                mismatches.append((batch, err))
        for text in lists[:200]:
            theirs, err = self.scontrol(text)
            if a.expand_hostlist(text) != theirs or err:
                mismatches.append((text, err))
        self.assertEqual(mismatches, [])

    def test_scontrol_itself_matches_the_table_where_22_05_accepts(self):
        for text, expected in VALID_HOSTLISTS:
            if "]" in text and not text.rstrip().endswith("]") and "-ib" in text or ".ib" in text:
                continue  # suffix after ']': only Slurm >= 23.02.5 (Debian 12 ships 22.05)
            with self.subTest(text=text):
                self.assertEqual(self.scontrol(text)[0], expected)

    def test_invalid_lists_fail_in_scontrol_backend_too(self):
        for text, _ in INVALID_HOSTLISTS:
            if not text.strip(" ,\t") or text in ("n[ 1-3]", "n[+1-3]"):
                continue  # scontrol's strtoul takes ' 1' and '+1' (width 2: n01 n02 n03); we refuse them
            with self.subTest(text=text):
                with self.assertRaises(a.HostlistError):
                    a.scontrol_hostnames(text)

    def test_newline_separates_in_both_backends(self):
        # Raw scontrol keeps a newline inside a name ('a\nb[1-2]' prints a b1 a b2); the
        # backend turns newlines into commas so both backends read the list the same way.
        self.assertEqual(self.scontrol("a\nb[1-2]")[0], ["a", "b1", "a", "b2"])
        self.assertEqual(a.scontrol_hostnames("a\nb[1-2]"), ["a", "b1", "b2"])
        self.assertEqual(a.expand_hostlist("a\nb[1-2]"), ["a", "b1", "b2"])

    def test_scontrol_garbage_is_caught(self):
        # scontrol prints "node]" for "node[1-" and exits 0; we must not return that.
        self.assertEqual(self.scontrol("node[1-")[0], ["node]"])
        with self.assertRaises(a.HostlistError) as ctx:
            a.scontrol_hostnames("node[1-")
        self.assertIn("'node]'", str(ctx.exception))

    def test_scontrol_message_is_surfaced(self):
        with self.assertRaises(a.HostlistError) as ctx:
            a.scontrol_hostnames("node[3-1]")
        self.assertIn("Invalid range", str(ctx.exception))

    def test_auto_backend_uses_scontrol(self):
        names, backend = a.resolve_hostnames("n[1-3]", "auto")
        self.assertEqual((names, backend), (["n1", "n2", "n3"], "scontrol"))

    def test_shell_hostile_input_is_inert(self):
        marker = os.path.join(self.tmp, "pwned")
        for text in (f"n1;touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"n1&&touch {marker}",
                     f"n1|touch {marker}"):
            for backend in ("scontrol", "python"):
                with self.subTest(text=text, backend=backend):
                    with self.assertRaises(a.HostlistError):
                        a.discover_servers(text, 0, backend=backend, env={})
            code, out, err = run_cli("discover", "--nodelist", text, "--num-training-nodes", "0",
                                     "--hostlist-backend", "scontrol", env={"SLURM_CONF": self.conf,
                                                                            "PATH": os.environ["PATH"]})
            self.assertEqual(code, 2, err)
            self.assertEqual(out, "")
        self.assertFalse(os.path.exists(marker))

    def test_option_injection_is_refused(self):
        with self.assertRaises(a.HostlistError):
            a.scontrol_hostnames("-h")


class ScontrolMissing(unittest.TestCase):
    def test_missing_scontrol_falls_back_with_a_log_line(self):
        with mock.patch.dict(os.environ, {"PATH": "/nonexistent"}), self.assertLogs("atropos_slurm", "WARNING") as logs:
            names, backend = a.resolve_hostnames("n[1-2]", "auto")
        self.assertEqual((names, backend), (["n1", "n2"], "python"))
        self.assertIn("expanding the hostlist in Python", logs.output[0])

    def test_forced_scontrol_missing_is_an_error(self):
        with mock.patch.dict(os.environ, {"PATH": "/nonexistent"}):
            with self.assertRaises(a.ConfigError) as ctx:
                a.resolve_hostnames("n[1-2]", "scontrol")
        self.assertIn("not found", str(ctx.exception))

    def test_scontrol_without_config_falls_back(self):
        require("scontrol", shutil.which("scontrol") is not None, "install slurm-client")
        with tempfile.TemporaryDirectory() as tmp:
            # No slurm.conf anywhere: scontrol tries DNS SRV, then exits 1.
            env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
            env["SLURM_CONF"] = os.path.join(tmp, "empty.conf")
            open(env["SLURM_CONF"], "w").close()  # empty: "ClusterName needs to be specified", exit 1
            with mock.patch.dict(os.environ, env, clear=True), self.assertLogs("atropos_slurm", "WARNING"):
                names, backend = a.resolve_hostnames("n[1-2]", "auto")
        self.assertEqual((names, backend), (["n1", "n2"], "python"))

    def test_hanging_scontrol_is_bounded(self):
        with tempfile.TemporaryDirectory() as tmp:
            fake = os.path.join(tmp, "scontrol")
            with open(fake, "w") as f:
                f.write("#!/bin/sh\nsleep 30\n")
            os.chmod(fake, 0o755)
            with self.assertRaises(a.ScontrolUnavailable) as ctx:
                a.scontrol_hostnames("n1", scontrol=fake, timeout=0.5)
        self.assertIn("did not answer", str(ctx.exception))


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------

class Discovery(unittest.TestCase):
    def env(self, **values):
        base = {"SLURM_JOB_NODELIST": "gpu[01-03]", "NUM_TRAINING_NODES": "1", a.ENV_HOSTLIST_BACKEND: "python"}
        base.update(values)
        return {k: v for k, v in base.items() if v is not None}

    def test_seed_defaults(self):
        found = a.discover_servers(env=self.env())
        self.assertEqual(found.inference_nodes, ("gpu02", "gpu03"))
        self.assertEqual(found.layout.servers_per_node, 8)
        self.assertEqual(found.urls[:2], ["http://gpu02:9000/v1", "http://gpu02:9001/v1"])
        self.assertEqual(found.urls[-1], "http://gpu03:9007/v1")
        self.assertEqual(len(found.urls), 16)

    def test_variable_matrix(self):
        for nodes, ntrain, tp, gpus, base in [(2, 1, 1, 8, 9000), (3, 1, 2, 8, 9000), (4, 2, 4, 8, 9100),
                                              (5, 0, 8, 8, 9000), (3, 1, 1, 4, 20000), (2, 1, 3, 8, 9000)]:
            env = self.env(SLURM_JOB_NODELIST=f"n[1-{nodes}]", NUM_TRAINING_NODES=str(ntrain), INFER_TP=str(tp),
                           **{a.ENV_GPUS_PER_NODE: str(gpus), a.ENV_BASE_PORT: str(base)})
            with self.subTest(nodes=nodes, ntrain=ntrain, tp=tp, gpus=gpus, base=base):
                found = a.discover_servers(env=env)
                per = gpus // tp
                expected = [f"http://n{k}:{base + i}/v1" for k in range(ntrain + 1, nodes + 1) for i in range(per)]
                self.assertEqual(found.urls, expected)
                self.assertEqual([s.node_index for s in found.servers][-1], nodes - ntrain - 1)

    def test_slurm_nodelist_fallback(self):
        env = self.env(SLURM_JOB_NODELIST=None, SLURM_NODELIST="x[1-2]")
        self.assertEqual(a.discover_servers(env=env).inference_nodes, ("x2",))

    def test_arguments_override_environment(self):
        found = a.discover_servers("h[1-2]", 0, 4, 8, 9500, "python", env=self.env())
        self.assertEqual(found.urls, [f"http://h{k}:{p}/v1" for k in (1, 2) for p in (9500, 9501)])

    def test_tp_not_dividing_warns(self):
        with self.assertLogs("atropos_slurm", "WARNING") as logs:
            found = a.discover_servers(env=self.env(INFER_TP="3"))
        self.assertEqual(found.layout.servers_per_node, 2)
        self.assertIn("does not divide", logs.output[0])

    def test_bad_values_are_one_line_errors_naming_the_variable(self):
        cases = [
            (dict(SLURM_JOB_NODELIST=None), "SLURM_JOB_NODELIST is not set"),
            (dict(NUM_TRAINING_NODES=None), "NUM_TRAINING_NODES is not set"),
            (dict(NUM_TRAINING_NODES="one"), "NUM_TRAINING_NODES='one' is not an integer"),
            (dict(NUM_TRAINING_NODES="-1"), "NUM_TRAINING_NODES='-1' must be at least 0"),
            (dict(NUM_TRAINING_NODES="3"), "NUM_TRAINING_NODES=3 leaves no inference node"),
            (dict(NUM_TRAINING_NODES="7"), "NUM_TRAINING_NODES=7 leaves no inference node"),
            (dict(INFER_TP="2.0"), "INFER_TP='2.0' is not an integer"),
            (dict(INFER_TP="0"), "INFER_TP='0' must be at least 1"),
            (dict(INFER_TP="-2"), "INFER_TP='-2' must be at least 1"),
            (dict(INFER_TP=""), "INFER_TP='' is not an integer"),
            (dict(INFER_TP="12"), "INFER_TP=12 needs 12 GPUs per server, more than a node's 8 (default) and not a "
                                  "multiple of it"),
            (dict(INFER_TP="8", INFER_PP="3"), "2 inference node(s) of nodelist 'gpu[01-03]' cannot be split into "
                                               "servers of 3 nodes each (INFER_TP=8 x INFER_PP=3 on 8 GPUs per node)"),
            ({a.ENV_GPUS_PER_NODE: "0"}, "ATROPOS_SLURM_GPUS_PER_NODE='0' must be at least 1"),
            ({a.ENV_GPUS_PER_NODE: "eight"}, "ATROPOS_SLURM_GPUS_PER_NODE='eight' is not an integer"),
            ({a.ENV_BASE_PORT: "65530"}, "ATROPOS_SLURM_BASE_PORT='65530' must be at most 65528"),
            ({a.ENV_BASE_PORT: "0"}, "ATROPOS_SLURM_BASE_PORT='0' must be at least 1"),
            ({a.ENV_HOSTLIST_BACKEND: "slurm"}, "ATROPOS_SLURM_HOSTLIST='slurm' is not one of"),
            (dict(SLURM_JOB_NODELIST="gpu[3-1]"), "reversed range '3-1'"),
        ]
        for values, message in cases:
            with self.subTest(values=values):
                with self.assertRaises(a.ConfigError) as ctx:
                    a.discover_servers(env=self.env(**values))
                self.assertIn(message, str(ctx.exception))
                self.assertNotIn("\n", str(ctx.exception))

    def test_json_shape(self):
        data = a.discover_servers(env=self.env(INFER_TP="4")).to_json()
        self.assertEqual(data["training_nodes"], ["gpu01"])
        self.assertEqual(data["ports"], [9000, 9001])
        self.assertEqual(data["servers"][0], {"host": "gpu02", "port": 9000, "node_index": 0, "local_index": 0,
                                              "scheme": "http", "path": "/v1", "url": "http://gpu02:9000/v1"})
        self.assertEqual((data["source"], data["gpus_per_node"], data["gpus_from"], data["nodes_per_server"]),
                         ("slurm", 8, "default", 1))


# ----------------------------------------------------------------------------------------------
# Clusters as they are: heterogeneous jobs, GPUs from the allocation, servers spanning nodes,
# server lists.  The Slurm variables below are the ones Slurm 22.05 set on the lab
# (tests/slurm_lab) for `sbatch -N1 --gpus-per-node=h100:1 : -N2 --gpus-per-node=h100:2,a100:2`;
# nodelists are expanded by the real scontrol.
# ----------------------------------------------------------------------------------------------

HET_JOB_ENV = {  # the batch script's environment (SLURM_JOB_NODELIST is component 0's alone)
    "SLURM_HET_SIZE": "2", "SLURM_JOB_NODELIST": "node1",
    "SLURM_JOB_NODELIST_HET_GROUP_0": "node1", "SLURM_JOB_NODELIST_HET_GROUP_1": "node[2-3]",
    "SLURM_GPUS_PER_NODE_HET_GROUP_0": "h100:1", "SLURM_GPUS_PER_NODE_HET_GROUP_1": "h100:2,a100:2",
}


class ClusterShapes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require("scontrol", shutil.which("scontrol") is not None, "install Debian's slurm-client (apt-get install "
                "slurm-client) to expand the nodelists with the real scontrol")
        cls.tmp = tempfile.mkdtemp()
        cls.conf = os.path.join(cls.tmp, "slurm.conf")
        with open(cls.conf, "w") as f:
            f.write("ClusterName=x\nSlurmctldHost=localhost\n")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def env(self, base=None, **values):
        env = dict(HET_JOB_ENV if base is None else base, SLURM_CONF=self.conf, PATH=os.environ["PATH"])
        env[a.ENV_HOSTLIST_BACKEND] = "scontrol"
        env.update(values)
        return {k: v for k, v in env.items() if v is not None}

    def discover(self, **values):
        env = self.env(**values)
        with mock.patch.dict(os.environ, env, clear=True):  # scontrol reads SLURM_CONF from our environment
            return a.discover_servers(env=env)

    # -- GPUs per node from the allocation ---------------------------------------------------

    def test_gpu_forms_slurm_writes(self):
        # 22.05 wrote '4', 'h100:2' and 'h100:4,a100:2' (--gpus-per-node=4, h100:2, h100:4,a100:2);
        # the gres-prefixed form is accepted too.
        for text, gpus in [("4", 4), ("h100:2", 2), ("h100:4,a100:2", 6), ("gpu:h100:4", 4), ("gpu:4", 4),
                           ("a100_80g:8", 8), (" 8 ", 8)]:
            with self.subTest(text=text):
                self.assertEqual(a.parse_gpus_per_node("SLURM_GPUS_PER_NODE", text), gpus)
        for text in ("", "h100", "4x", "h100:-1", "h100:4;a100:2", "gpu:h100:4:1", "0", "h100:0", "99999"):
            with self.subTest(text=text):
                with self.assertRaises(a.ConfigError) as ctx:
                    a.parse_gpus_per_node("SLURM_GPUS_PER_NODE", text)
                self.assertIn(f"SLURM_GPUS_PER_NODE={text!r}", str(ctx.exception))

    def test_which_variable_decides_the_gpus(self):
        plain = {"SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1"}
        for values, gpus, source in [
            ({}, 8, "default"),
            ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4, "SLURM_GPUS_PER_NODE"),
            ({"SLURM_GPUS_PER_NODE": "h100:4", a.ENV_GPUS_PER_NODE: "2"}, 2, a.ENV_GPUS_PER_NODE),
        ]:
            with self.subTest(values=values):
                found = self.discover(base=plain, **values)
                self.assertEqual((found.layout.gpus_per_node, found.layout.gpus_from), (gpus, source))
                self.assertEqual(len(found.urls), 2 * gpus)
        env = self.env(plain, SLURM_GPUS_PER_NODE="4")
        with mock.patch.dict(os.environ, env, clear=True):
            self.assertEqual(a.discover_servers(gpus_per_node=1, env=env).layout.gpus_from, "--gpus-per-node")

    # -- heterogeneous jobs --------------------------------------------------------------------

    def test_het_job_serves_from_the_last_component(self):
        found = self.discover()
        self.assertEqual((found.het_group, found.backend), (1, "scontrol"))
        self.assertEqual((found.training_nodes, found.inference_nodes), (("node1",), ("node2", "node3")))
        self.assertEqual((found.layout.gpus_per_node, found.layout.gpus_from), (4, "SLURM_GPUS_PER_NODE_HET_GROUP_1"))
        self.assertEqual(found.urls, [f"http://node{k}:{9000 + i}/v1" for k in (2, 3) for i in range(4)])

    def test_manager_in_a_het_job_discovers_despite_a_one_node_job_nodelist(self):
        # Atropos' rule "a one-node SLURM_JOB_NODELIST discovers nothing" must not read component 0's list.
        env = self.env()
        with mock.patch.dict(os.environ, env, clear=True):
            for manager in (ServerManager(ServerBaseline(), slurm=True), ServerManager(ServerBaseline())):
                self.assertEqual([s.config.base_url for s in manager.servers],
                                 [f"http://node{k}:{9000 + i}/v1" for k in (2, 3) for i in range(4)])

    def test_het_job_other_component_and_tp(self):
        found = self.discover(**{a.ENV_INFERENCE_HET_GROUP: "0", "INFER_TP": "1"})
        self.assertEqual((found.training_nodes, found.inference_nodes), (("node2", "node3"), ("node1",)))
        self.assertEqual(found.urls, ["http://node1:9000/v1"])  # component 0 has h100:1
        found = self.discover(INFER_TP="2", NUM_TRAINING_NODES="1")  # agreeing is fine
        self.assertEqual(found.urls, [f"http://node{k}:{9000 + i}/v1" for k in (2, 3) for i in range(2)])

    def test_het_job_three_components(self):
        found = self.discover(SLURM_HET_SIZE="3", SLURM_JOB_NODELIST_HET_GROUP_2="gpu[07-08]",
                              SLURM_GPUS_PER_NODE_HET_GROUP_2="1", **{a.ENV_INFERENCE_HET_GROUP: "1"})
        self.assertEqual(found.training_nodes, ("node1", "gpu07", "gpu08"))
        self.assertEqual(found.nodes, ("node1", "node2", "node3", "gpu07", "gpu08"))
        self.assertEqual(len(found.urls), 8)

    def test_het_job_errors(self):
        for values, message in [
            (dict(NUM_TRAINING_NODES="2"), "NUM_TRAINING_NODES=2 contradicts the heterogeneous job: the components "
                                           "other than the inference one (1) have 1 node(s)"),
            ({a.ENV_INFERENCE_HET_GROUP: "2"}, "ATROPOS_SLURM_INFERENCE_HET_GROUP='2' must be at most 1"),
            ({a.ENV_INFERENCE_HET_GROUP: "last"}, "ATROPOS_SLURM_INFERENCE_HET_GROUP='last' is not an integer"),
            (dict(SLURM_HET_SIZE="two"), "SLURM_HET_SIZE='two' is not an integer"),
            (dict(SLURM_JOB_NODELIST_HET_GROUP_1=None),
             "SLURM_HET_SIZE=2 but SLURM_JOB_NODELIST_HET_GROUP_1 is not set"),
            (dict(SLURM_JOB_NODELIST_HET_GROUP_1="node[3-2]"), "scontrol rejected hostlist 'node[3-2]'"),
            (dict(SLURM_GPUS_PER_NODE_HET_GROUP_1="lots"), "SLURM_GPUS_PER_NODE_HET_GROUP_1='lots' is not a GPU count"),
        ]:
            with self.subTest(values=values):
                with self.assertRaises(a.ConfigError) as ctx:
                    self.discover(**values)
                self.assertIn(message, str(ctx.exception))
                self.assertNotIn("\n", str(ctx.exception))
        plain = {"SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1", a.ENV_INFERENCE_HET_GROUP: "1"}
        with self.assertRaises(a.ConfigError) as ctx:
            self.discover(base=plain)
        self.assertIn("is set but this is not a heterogeneous job (SLURM_HET_SIZE is not set)", str(ctx.exception))

    def test_explicit_nodelist_ignores_the_het_job(self):
        env = self.env(SLURM_GPUS_PER_NODE_HET_GROUP_0="gpu:4")  # both components 4 GPUs a node
        with mock.patch.dict(os.environ, env, clear=True):
            found = a.discover_servers("x[1-2]", 1, env=env)
        self.assertEqual((found.het_group, found.inference_nodes, found.layout.gpus_per_node), (None, ("x2",), 4))
        self.assertEqual(found.layout.gpus_from, "SLURM_GPUS_PER_NODE_HET_GROUP_0")

    def test_explicit_nodelist_in_a_het_job_of_different_gpus_needs_the_gpu_count(self):
        """SLURM_GPUS_PER_NODE is component 0's: with components of 1 and 4 GPUs a node, a
        nodelist given by hand may name either, so the count must be given too (it was 8, silently)."""
        env = self.env(SLURM_GPUS_PER_NODE="h100:1")
        with mock.patch.dict(os.environ, env, clear=True):
            with self.assertRaisesRegex(a.ConfigError, r"^--nodelist inside a heterogeneous job whose components have "
                                        r"different GPUs per node \(SLURM_GPUS_PER_NODE_HET_GROUP_0='h100:1', "
                                        r"SLURM_GPUS_PER_NODE_HET_GROUP_1='h100:2,a100:2'\): give --gpus-per-node"):
                a.discover_servers("node[2-3]", 0, env=env)
            found = a.discover_servers("node[2-3]", 0, gpus_per_node=4, env=env)
            self.assertEqual(len(found.urls), 8)
            found = a.discover_servers("node[2-3]", 0, env=dict(env, **{a.ENV_GPUS_PER_NODE: "4"}))
            self.assertEqual((len(found.urls), found.layout.gpus_from), (8, a.ENV_GPUS_PER_NODE))
        code, out, err = run_cli("discover", "--nodelist", "node[2-3]", "--num-training-nodes", "0", env=env)
        self.assertEqual((code, out, len(err.strip().splitlines())), (2, "", 1), err)

    # -- servers that span nodes ---------------------------------------------------------------

    def test_servers_spanning_nodes(self):
        plain = {"SLURM_JOB_NODELIST": "n[1-5]", "NUM_TRAINING_NODES": "1", "SLURM_GPUS_PER_NODE": "8"}
        for values, urls, span in [
            (dict(INFER_TP="16"), ["http://n2:9000/v1", "http://n4:9000/v1"], 2),
            (dict(INFER_TP="8", INFER_PP="4"), ["http://n2:9000/v1"], 4),
            (dict(INFER_TP="4", INFER_PP="2"), [f"http://n{k}:9000/v1" for k in range(2, 6)], 1),
            (dict(INFER_TP="2", INFER_PP="2"), [f"http://n{k}:{p}/v1" for k in range(2, 6) for p in (9000, 9001)], 1),
        ]:
            with self.subTest(values=values):
                found = self.discover(base=plain, **values)
                self.assertEqual((found.urls, found.layout.nodes_per_server), (urls, span))
        found = self.discover(base=plain, INFER_TP="16")
        self.assertEqual([s.node_index for s in found.servers], [0, 2])  # the head node's index
        for values, message in [
            (dict(INFER_TP="12"), "INFER_TP=12 needs 12 GPUs per server, more than a node's 8 (SLURM_GPUS_PER_NODE)"),
            (dict(INFER_TP="8", INFER_PP="3"), "4 inference node(s) of nodelist 'n[1-5]' cannot be split into servers "
                                               "of 3 nodes each (INFER_TP=8 x INFER_PP=3 on 8 GPUs per node)"),
            (dict(INFER_PP="0"), "INFER_PP='0' must be at least 1"),
        ]:
            with self.subTest(values=values):
                with self.assertRaises(a.ConfigError) as ctx:
                    self.discover(base=plain, **values)
                self.assertIn(message, str(ctx.exception))

    # -- a server list -------------------------------------------------------------------------

    def test_server_list_variable_and_file(self):
        urls = ["http://a:9000/v1", "https://b.example:8443/v1", "http://[::1]:9100/v1", "http://a:9001/v1"]
        found = self.discover(**{a.ENV_SERVERS: " , ".join(urls[:2]) + "\n\t" + " ".join(urls[2:])})
        self.assertEqual(found.urls, urls)
        self.assertEqual((found.source, found.layout, found.inference_nodes),
                         (a.ENV_SERVERS, None, ("a", "b.example", "::1")))
        self.assertEqual([(s.node_index, s.local_index) for s in found.servers], [(0, 0), (1, 0), (2, 0), (0, 1)])
        path = os.path.join(self.tmp, "servers.txt")
        with open(path, "w", encoding="utf-8-sig", newline="\r\n") as f:  # as a Windows editor saves it
            f.write("# servers of job 123\nhttp://a:9000/v1   # the first\n\nhttps://b.example:8443/v1/\n")
        found = self.discover(**{a.ENV_SERVERS: "@" + path})
        self.assertEqual(found.urls, ["http://a:9000/v1", "https://b.example:8443/v1"])

    def test_server_list_errors_name_the_variable(self):
        missing = os.path.join(self.tmp, "nope.txt")
        path = os.path.join(self.tmp, "bad.txt")
        with open(path, "w") as f:
            f.write("http://a:9000/v1\n# fine\nftp://b:21/v1\n")
        for value, message in [
            ("http://a:9000/v1,h:9000", "ATROPOS_SLURM_SERVERS (entry 2): base_url='h:9000' must look like "
                                        "http://host:port/v1"),
            ("http://user:pw@a:9000/v1", "ATROPOS_SLURM_SERVERS (entry 1): base_url='http://***@a:9000/v1' must not "
                                         "carry credentials"),
            ("http://a:9000/v1 http://a:9000/v1/", "(entry 2): 'http://a:9000/v1/' is listed twice (also entry 1)"),
            ("@" + missing, f"ATROPOS_SLURM_SERVERS='@{missing}': cannot read '{missing}': No such file"),
            ("@" + path, f"ATROPOS_SLURM_SERVERS ({path} line 3): base_url='ftp://b:21/v1' must look like"),
            (" , ", "ATROPOS_SLURM_SERVERS=',' lists no server URL"),
            ("http://a:0/v1", "ATROPOS_SLURM_SERVERS (entry 1): base_url='http://a:0/v1' has port 0"),  # was a:80
        ]:
            with self.subTest(value=value):
                with self.assertRaises(a.ConfigError) as ctx:
                    self.discover(**{a.ENV_SERVERS: value})
                self.assertIn(message, str(ctx.exception))
                self.assertNotIn("pw", str(ctx.exception))

    def test_a_server_list_of_the_most_servers_on_as_many_hosts_is_read(self):
        # Each server's node index was list(hosts).index(host): quadratic in the hosts, so a file
        # of MAX_SERVERS URLs on distinct hosts kept `discover` busy for about 11 minutes (a hang).
        path = os.path.join(self.tmp, "many.txt")
        with open(path, "w") as f:
            f.write("".join(f"http://h{i}:9000/v1\n" for i in range(a.MAX_SERVERS - 1)) + "http://h0:9001/v1\n")
        result = run_module("discover", "--servers", "@" + path, env={}, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout.splitlines()), a.MAX_SERVERS)
        found = a.listed_servers("http://a:1/v1 http://b:1/v1 http://a:2/v1 http://c:5/v1 http://b:7/v1")
        self.assertEqual([(s.node_index, s.local_index) for s in found.servers], [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1)])
        self.assertEqual(found.inference_nodes, ("a", "b", "c"))

    def test_server_list_wins_over_slurm_for_every_consumer(self):
        urls = [f"http://127.0.0.1:{closed_port()}/v1", f"http://127.0.0.1:{closed_port()}/v1"]
        env = self.env(**{a.ENV_SERVERS: ",".join(urls)})  # in a heterogeneous job: the list wins
        with mock.patch.dict(os.environ, env, clear=True):
            manager = ServerManager(ServerBaseline(), slurm=True)
            self.assertEqual([s.config.base_url for s in manager.servers], urls)
        code, out, err = run_cli("discover", "--explain", env=env)
        self.assertEqual((code, out.split()), (0, urls), err)
        self.assertIn("2 server(s) listed by ATROPOS_SLURM_SERVERS on 1 host(s); no Slurm discovery", err)
        code, out, err = run_cli("discover", "--servers", "http://x:1/v1", env=env)
        self.assertEqual(out.split(), ["http://x:1/v1"])
        code, out, err = run_cli("wait", "--timeout", "0.3", "--interval", "0.1", env=env)
        self.assertEqual(code, 1, err)
        self.assertIn("fewer than 2 of 2 servers healthy", err)
        self.assertIn(urls[1], err)

    # -- the CLI -------------------------------------------------------------------------------

    def test_discover_explain_says_what_decided(self):
        code, out, err = run_cli("discover", "--explain", env=self.env(INFER_TP="4", INFER_PP="2"))
        self.assertEqual((code, out.split()), (0, ["http://node2:9000/v1"]), err)
        for line in ["discover: heterogeneous job: the servers are component 1's nodes",
                     "discover: nodes: 1 training 'node1', 2 inference 'node2 node3' (hostlist backend scontrol)",
                     "discover: GPUs per node: 4, from SLURM_GPUS_PER_NODE_HET_GROUP_1",
                     "discover: GPUs per server: INFER_TP 4 x INFER_PP 2 = 8",
                     "discover: each server spans 2 nodes and listens on the first, port 9000"]:
            self.assertIn(line, err)

    def test_new_variables_are_one_line_errors_exit_2(self):
        for values, fragment in [
            (dict(INFER_PP="x"), "INFER_PP='x' is not an integer"),
            (dict(SLURM_GPUS_PER_NODE_HET_GROUP_1="h100"), "SLURM_GPUS_PER_NODE_HET_GROUP_1='h100' is not a GPU count"),
            ({a.ENV_INFERENCE_HET_GROUP: "-1"}, "ATROPOS_SLURM_INFERENCE_HET_GROUP='-1' must be at least 0"),
            ({a.ENV_SERVERS: "nonsense"}, "ATROPOS_SLURM_SERVERS (entry 1): base_url='nonsense'"),
        ]:
            with self.subTest(values=values):
                code, out, err = run_cli("discover", env=self.env(**values))
                self.assertEqual((code, out), (2, ""))
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(fragment, err)


# ----------------------------------------------------------------------------------------------
# Config objects
# ----------------------------------------------------------------------------------------------

class Configs(unittest.TestCase):
    def test_atropos_defaults(self):
        base = ServerBaseline()
        self.assertEqual((base.timeout, base.num_max_requests_at_once, base.num_requests_for_eval, base.model_name,
                          base.rolling_buffer_length, base.server_type, base.tokenizer_name),
                         (1200, 512, 64, "default", 1000, "openai", "none"))
        cfg = APIServerConfig()
        self.assertEqual((cfg.api_key, cfg.base_url, cfg.n_kwarg_is_ignored, cfg.health_check), ("", "", False, True))

    def test_validation(self):
        for kwargs, message in [(dict(timeout=-1), "timeout=-1"), (dict(timeout=0), "timeout=0"),
                                (dict(num_max_requests_at_once=0), "num_max_requests_at_once=0"),
                                (dict(num_requests_for_eval=-3), "num_requests_for_eval=-3"),
                                (dict(num_max_requests_at_once=True), "num_max_requests_at_once=True"),
                                (dict(server_type="tgi"), "server_type='tgi'"),
                                (dict(health_path="health"), "health_path='health'")]:
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(a.ConfigError) as ctx:
                    ServerBaseline(**kwargs)
                self.assertIn(message, str(ctx.exception))
        for url in ("ftp://h/v1", "h:9000", "http://:9000/v1", "http://h:99999/v1", "http://h:9000/v1?x=1",
                    "http://h:0/v1", "https://h:00/v1"):  # port 0 was read as 80 (443)
            with self.subTest(url=url):
                with self.assertRaises(a.ConfigError):
                    APIServerConfig(base_url=url)
        self.assertEqual(a.parse_base_url("http://h:/v1"), ("http", "h", 80, "/v1"), "an empty port is the scheme's")

    def test_base_url_fast_path_agrees_with_urlsplit(self):
        urls = ["http://h:9000/v1", "https://h:443/v1/", "http://10.0.0.1:1/", "http://h:65535", "http://h:0/v1",
                "http://h:65536/v1", "http://h:09000/v1", "http://H:9000/v1", "HTTP://h:9000/v1", "http://h/v1",
                "http://h:9000/v1?x", "http://h:9000/v1#f", "http://u@h:9000/v1", "http://[::1]:9000/v1",
                "http://h:9000/a%20b", "http://h:9000//v1//", "http://h:9000/v1 ", " http://h:9000/v1",
                "http://h:9000/v\t1", "http://h_1.x-y:9000/v1", "http://h:-1/v1", "ftp://h:21/v1", "http://:9000/v1",
                b"http://h:9000/v1", "http://h:9000\n/v1"]
        rng = random.Random(5)
        alphabet = "hH:/.0129%@[]?#_-~ \t"
        urls += ["http://" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14))) for _ in range(3000)]
        for url in urls:
            with self.subTest(url=url):
                outcomes = []
                for parse in (a.parse_base_url, a._split_base_url):
                    try:
                        outcomes.append(parse(url))
                    except a.ConfigError as e:
                        outcomes.append(str(e))
                self.assertEqual(outcomes[0], outcomes[1])

    def test_api_key_hidden_from_repr(self):
        cfg = APIServerConfig(base_url="http://h:9000/v1", api_key="sk-secret-123")
        self.assertNotIn("sk-secret-123", repr(cfg))
        server = a.OpenAIServer(cfg)
        self.assertNotIn("sk-secret-123", repr(server))
        manager = ServerManager([cfg])
        self.assertNotIn("sk-secret-123", repr(manager))

    def test_configs_for_urls_from_baseline(self):
        urls = ["http://a:9000/v1", "http://a:9001/v1"]
        configs = a.configs_for_urls(ServerBaseline(timeout=30, num_max_requests_at_once=7), urls)
        self.assertEqual([c.base_url for c in configs], urls)
        self.assertTrue(all(isinstance(c, APIServerConfig) and c.timeout == 30 and c.num_max_requests_at_once == 7
                            for c in configs))

    def test_configs_for_urls_keeps_the_template_key(self):
        template = APIServerConfig(base_url="http://dummy", api_key="k1", model_name="m", health_path="/ping")
        (config,) = a.configs_for_urls(template, ["http://b:9000/v1"])
        self.assertEqual((config.base_url, config.api_key, config.model_name, config.health_path),
                         ("http://b:9000/v1", "k1", "m", "/ping"))
        self.assertEqual(template.base_url, "http://dummy")

    def test_manager_slurm_uses_discovery_and_the_first_config_as_template(self):
        env = {"SLURM_JOB_NODELIST": "t1,i[1-2]", "NUM_TRAINING_NODES": "1", "INFER_TP": "4",
               a.ENV_HOSTLIST_BACKEND: "python"}
        with mock.patch.dict(os.environ, env):
            manager = ServerManager(configs=[APIServerConfig(base_url="http://dummy", api_key="x", timeout=5),
                                             APIServerConfig(base_url="http://other")], slurm=True)
        self.assertEqual([s.url for s in manager.servers],
                         ["http://i1:9000/v1", "http://i1:9001/v1", "http://i2:9000/v1", "http://i2:9001/v1"])
        self.assertTrue(all(s.config.timeout == 5 for s in manager.servers))

    def test_manager_slurm_with_bad_environment_is_a_config_error(self):
        with mock.patch.dict(os.environ, {"SLURM_JOB_NODELIST": "n[1-2]", "INFER_TP": "2"}, clear=True):
            with self.assertRaises(a.ConfigError) as ctx:
                ServerManager(configs=ServerBaseline(), slurm=True)
        self.assertIn("NUM_TRAINING_NODES is not set", str(ctx.exception))

    def test_manager_local_default_is_atropos(self):
        manager = ServerManager(configs=ServerBaseline())
        self.assertEqual([s.url for s in manager.servers], [f"http://localhost:{p}/v1" for p in range(9004, 9008)])

    def test_manager_rejects_bad_configs(self):
        with self.assertRaises(a.ConfigError):
            ServerManager(configs=[])
        with self.assertRaises(a.ConfigError):
            ServerManager(configs=[APIServerConfig(base_url="http://h/v1")], max_n_completions=0)

    def test_error_hierarchy_splits_blame(self):
        self.assertTrue(issubclass(a.HostlistError, a.ConfigError))
        for cls in (a.ServerConnectionError, a.ServerTimeoutError, a.ProtocolError, a.APIStatusError,
                    a.NoHealthyServerError, a.ResponseTooLargeError):
            self.assertTrue(issubclass(cls, a.ServerError))
            self.assertFalse(issubclass(cls, a.ConfigError))
        self.assertTrue(issubclass(a.ServerError, a.AtroposSlurmError))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

class CLI(unittest.TestCase):
    ENV = {"SLURM_JOB_NODELIST": "t1,inf[1-2]", "NUM_TRAINING_NODES": "1", "INFER_TP": "2",
           a.ENV_HOSTLIST_BACKEND: "python"}

    def test_discover_text(self):
        code, out, err = run_cli("discover", env=self.ENV)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split(), [f"http://inf{k}:{9000 + i}/v1" for k in (1, 2) for i in range(4)])

    def test_discover_flags_override(self):
        code, out, _ = run_cli("discover", "--nodelist", "a[1-3]", "--num-training-nodes", "2", "--tp", "8",
                               "--gpus-per-node", "16", "--base-port", "8100", "--hostlist-backend", "python",
                               env=self.ENV)
        self.assertEqual((code, out.split()), (0, ["http://a3:8100/v1", "http://a3:8101/v1"]))

    def test_discover_json(self):
        code, out, _ = run_cli("discover", "--format", "json", env=self.ENV)
        data = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual(data["inference_nodes"], ["inf1", "inf2"])
        self.assertEqual(data["ports"], [9000, 9001, 9002, 9003])
        self.assertEqual(len(data["urls"]), 8)

    def test_hostnames(self):
        code, out, _ = run_cli("hostnames", "n[01-02],x", env={})
        self.assertEqual((code, out.split()), (0, ["n01", "n02", "x"]))

    def test_errors_are_one_line_exit_2(self):
        for argv, env, fragment in [
            (["discover"], {}, "SLURM_JOB_NODELIST is not set"),
            (["discover"], dict(self.ENV, INFER_TP="x"), "INFER_TP='x' is not an integer"),
            (["discover", "--tp", "0"], self.ENV, "--tp='0' must be at least 1"),
            (["discover", "--num-training-nodes", "3"], self.ENV, "leaves no inference node"),
            (["discover", "--format", "yaml"], self.ENV, "invalid choice"),
            (["hostnames", "n[1-"], {}, "unclosed '['"),
            (["frobnicate"], {}, "invalid choice"),
            ([], {}, "required"),
        ]:
            with self.subTest(argv=argv):
                code, out, err = run_cli(*argv, env=env)
                self.assertEqual(code, 2)
                self.assertEqual(out, "")
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(fragment, err)
                self.assertTrue(err.startswith("atropos-slurm: error: "), err)

    def test_subprocess_discover_and_error(self):
        env = dict(os.environ, **self.ENV)
        proc = run_module("discover", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(proc.stdout.split()), 8)
        env["NUM_TRAINING_NODES"] = "oops"
        proc = run_module("discover", env=env)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.strip(), "atropos-slurm: error: NUM_TRAINING_NODES='oops' is not an integer")
        self.assertNotIn("Traceback", proc.stderr)

    def test_import_loads_no_third_party_module(self):
        code = ("import sys; before = set(sys.modules); import atropos_slurm; "
                "std = set(getattr(sys, 'stdlib_module_names', ())); "
                "extra = {m.split('.')[0] for m in set(sys.modules) - before} - std - {'atropos_slurm'}; "
                "print(sorted(extra))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        if sys.version_info >= (3, 10):
            self.assertEqual(proc.stdout.strip(), "[]")

    def test_import_leaves_the_event_loop_and_single_use_modules_for_later(self):
        # What keeps the import fast (bench/bench_import.py); discovery runs without them too.
        heavy = ["asyncio", "ssl", "socket", "subprocess", "uuid", "runpy", "email.utils", "concurrent.futures"]
        code = (f"import sys; import atropos_slurm as a; print([m for m in {heavy!r} if m in sys.modules]); "
                "a.discover_servers('n[1-2]', 1, backend='python', env={}); "
                f"print([m for m in {heavy!r} if m in sys.modules])")
        proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=HERE,
                              timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.split("\n")[:2], ["[]", "[]"])


# ----------------------------------------------------------------------------------------------
# Hardening (issue 10): bounded hostlists, values that cannot be sent, numbers, closed pipes
# ----------------------------------------------------------------------------------------------

def peak_memory(call) -> int:
    """Bytes allocated at the peak of ``call()`` (tracemalloc: counted, not timed)."""
    tracemalloc.start()
    try:
        call()
    except a.AtroposSlurmError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


class HostlistBounds(unittest.TestCase):
    def test_the_size_is_counted_before_any_name_is_built(self):
        """Issue 10 item 14: a list past MAX_HOSTLIST_NAMES is refused before its names exist,
        however it is built: bracket groups multiplied, many tokens, or both in 6 KB."""
        # No subTest: a failure must stop here, before the 6 KB list below could eat the memory.
        for text in ("n[1-65536]" * 4, ",".join(["n[1-65536]"] * 40), "n[1-65536,1-65536,1-65536,1-65536,1-65536]"):
            self.assertLess(peak_memory(lambda: a.expand_hostlist(text)), 1 << 20, text[:40])
            with self.assertRaises(a.HostlistError) as ctx:
                a.expand_hostlist(text)
            self.assertIn(f"more than {a.MAX_HOSTLIST_NAMES} names", str(ctx.exception))
            self.assertLess(len(str(ctx.exception)), 200)
        six_kb = "n[1-65536]" * 600
        self.assertLess(peak_memory(lambda: a.expand_hostlist(six_kb)), 1 << 20)
        self.assertLess(peak_memory(lambda: a.resolve_hostnames(six_kb, "auto")), 1 << 20)  # before scontrol too
        self.assertEqual(len(a.expand_hostlist("a[1-4]b[1-65536]")), a.MAX_HOSTLIST_NAMES)  # the cap itself is fine

    def test_an_error_after_a_tp_that_leaves_gpus_idle_is_still_one_line(self):
        """The idle-GPU warning comes once every setting is checked: a mistake in another one is
        one line, not the warning and then the error (discover and the watcher)."""
        env = {"INFER_TP": "3", "SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1", "PATH": os.environ["PATH"]}
        for args, fragment in [
            (("discover", "--base-port", "70000"), "--base-port='70000' must be at most"),
            (("discover", "--num-training-nodes", "3"), "--num-training-nodes=3 leaves no inference node"),
            (("watch", "--api_addr", "http://t:8000", "--node_num", "x"), "--node_num='x' is not an integer"),
        ]:
            with self.subTest(args=args):
                code, out, err = run_cli(*args, "--hostlist-backend", "python", env=env) if args[0] == "discover" \
                    else run_cli(*args, env=env)
                self.assertEqual((code, out), (2, ""))
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(fragment, err)
        code, out, err = run_cli("discover", "--hostlist-backend", "python", env=env)
        self.assertEqual((code, len(out.split())), (0, 4), err)
        self.assertIn("INFER_TP=3 does not divide 8 GPUs per node: 2 servers per node, 2 GPUs idle", err)

    def test_discovery_caps_the_number_of_urls_before_building_them(self):
        """Issue 10 item 14: nodes x servers per node past MAX_SERVERS is one line, exit 2."""
        self.assertLess(peak_memory(lambda: a.discover_servers(
            nodelist="n[1-300]", num_training_nodes=0, gpus_per_node=1024, backend="python", env={})), 4 << 20)
        code, out, err = run_cli("discover", "--nodelist", "n[1-300]", "--num-training-nodes", "0",
                                 "--gpus-per-node", "1024", "--hostlist-backend", "python", env={})
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(f"more than {a.MAX_SERVERS} servers", err)

    def test_non_ascii_digits_are_refused(self):
        """Issue 10 item 18: ``re``'s \\d and ``int()`` take Arabic-Indic or full-width digits;
        scontrol does not, and neither do we (in ranges and in integer settings)."""
        for text in ("n[١-٣]", "n[１-３]", "n[1-٣]", "n[٧]"):
            with self.subTest(text=text):
                with self.assertRaises(a.HostlistError):
                    a.expand_hostlist(text)
        for value in ("١", "１", "٢٣"):
            with self.subTest(value=value):
                with self.assertRaises(a.ConfigError) as ctx:
                    a.discover_servers(nodelist="n[1-3]", num_training_nodes=value, backend="python", env={})
                self.assertIn("is not an integer", str(ctx.exception))
                with self.assertRaises(a.ConfigError):
                    a.discover_servers(nodelist="n[1-3]", num_training_nodes=1, backend="python",
                                       env={"INFER_TP": value})

    def test_thousands_of_digits_are_one_line_errors(self):
        """Issue 10 item 13: ``int()`` refuses more than 4,300 digits with a bare ValueError (3.11+);
        a range bound or a setting that long is a short ConfigError on every version."""
        digits = "1" * 5000
        for call in (lambda: a.expand_hostlist(f"n[{digits}]"), lambda: a.expand_hostlist(f"n[1-{digits}]"),
                     lambda: a.discover_servers(nodelist="n[1-3]", num_training_nodes=digits, backend="python",
                                                env={}),
                     lambda: a.discover_servers(nodelist="n[1-3]", num_training_nodes=1, backend="python",
                                                env={a.ENV_BASE_PORT: digits})):
            with self.assertRaises(a.ConfigError) as ctx:
                call()
            self.assertLess(len(str(ctx.exception)), 300)
        code, _, err = run_cli("discover", "--nodelist", "n[1-3]", "--num-training-nodes", digits, env={})
        self.assertEqual(code, 2)
        self.assertIn("more than 18 digits", err)


class UnsendableValues(unittest.TestCase):
    URL = "http://h:9000/v1"

    def test_control_characters_in_request_targets_are_refused(self):
        """Issue 10 item 11: a CR/LF (or any control character, or a space) in health_path or in
        the base URL's path would be sent inside the request line: refused at construction."""
        for path in ("/health\r\nX-Injected: 1", "/health\n", "/hea lth", "/h\x00", "/h\x7f", "/h\t"):
            with self.subTest(path=path):
                with self.assertRaises(a.ConfigError) as ctx:
                    ServerBaseline(health_path=path)
                self.assertIn("health_path=", str(ctx.exception))
                self.assertNotIn("\n", str(ctx.exception))
        for url in ("http://h:9000/v1\r\nX-Injected: 1", "http://h:9000/v1\n", "http://h:9000/v 1",
                    "http://h:9000/v1\t", "http://h:9000/\x01v1"):
            with self.subTest(url=url):
                with self.assertRaises(a.ConfigError):
                    APIServerConfig(base_url=url)
        code, _, err = run_cli("wait", "--nodelist", "n1", "--num-training-nodes", "0", "--hostlist-backend",
                               "python", "--timeout", "1", "--health-path", "/health\r\nX: 1", env={})
        self.assertEqual(code, 2)
        self.assertIn("--health-path=", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_credentials_in_a_base_url_are_refused_and_never_shown(self):
        """Issue 10 item 12: ``http://user:secret@host`` is refused, pointing to api_key; the
        secret is in no message, whatever else is wrong with the URL."""
        for url in ("http://user:s3cr3t@h:9000/v1", "http://s3cr3t@h:9000/v1", "https://u:s3cr3t@h/v1",
                    "http://u:s3cr3t@h:99999/v1", "http://u:s3cr3t@[::1:9000/v1", "http://u:s3c/r3t@h:9000/v1",
                    "ftp://u:s3cr3t@h/v1"):
            with self.subTest(url=url):
                with self.assertRaises(a.ConfigError) as ctx:
                    APIServerConfig(base_url=url)
                self.assertNotIn("s3cr3t", str(ctx.exception))
                self.assertNotIn("s3c", str(ctx.exception))
        with self.assertRaises(a.ConfigError) as ctx:
            APIServerConfig(base_url="http://user:s3cr3t@h:9000/v1")
        self.assertIn("api_key", str(ctx.exception))
        with self.assertRaises(a.ConfigError) as ctx:
            a.configs_for_urls(ServerBaseline(), ["http://user:s3cr3t@h:9000/v1"])
        self.assertNotIn("s3cr3t", str(ctx.exception))

    def test_an_api_key_or_url_that_cannot_be_sent_is_refused_at_construction(self):
        """Issue 10 item 13: a key with CR/LF, a space or non-ASCII, or a non-ASCII URL, used to
        fail only when the first request was built (or encoded); the key is never shown."""
        for key in ("sk-abc\r\nX-Injected: 1", "sk-abc\n", "sk ab", "sk-ключ", "sk-\x00"):
            with self.subTest(key=key):
                with self.assertRaises(a.ConfigError) as ctx:
                    APIServerConfig(base_url=self.URL, api_key=key)
                self.assertIn("api_key", str(ctx.exception))
                self.assertNotIn("sk-", str(ctx.exception))
        for url in ("http://gpü:9000/v1", "http://h:9000/vé1", "http://节点:9000/v1"):
            with self.subTest(url=url):
                with self.assertRaises(a.ConfigError):
                    APIServerConfig(base_url=url)
        for path in ("/hé", "/健康"):
            with self.subTest(path=path):
                with self.assertRaises(a.ConfigError):
                    ServerBaseline(health_path=path)
        self.assertEqual(APIServerConfig(base_url=self.URL, api_key="sk-Az09._~+/=").api_key, "sk-Az09._~+/=")
        self.assertIsNone(APIServerConfig(base_url=self.URL, api_key=None).api_key)  # no key, as before

    def test_nan_infinity_and_huge_numbers_in_config_fields(self):
        """Issue 10 item 13: NaN, infinity and integers too large for a float (or a deque) are
        refused at construction with a short message."""
        huge = 10 ** 5000  # its repr raises ValueError from 3.11 on: messages must not use it
        for name, value in (("timeout", float("nan")), ("timeout", float("inf")), ("timeout", huge),
                            ("connect_timeout", float("inf")), ("health_timeout", float("nan")), ("timeout", "10"),
                            ("num_max_requests_at_once", huge), ("rolling_buffer_length", huge),
                            ("num_requests_for_eval", 2 ** 31)):
            with self.subTest(name=name, value=type(value).__name__):
                with self.assertRaises(a.ConfigError) as ctx:
                    ServerBaseline(**{name: value})
                self.assertIn(f"{name}=", str(ctx.exception))
                self.assertLess(len(str(ctx.exception)), 200)
        self.assertEqual(ServerBaseline(timeout=0.5, connect_timeout=3).timeout, 0.5)

    def test_nan_infinity_and_huge_numbers_in_flags(self):
        """Issue 10 item 13: float flags took 'nan', 'inf' and '1e999' (argparse's float() does);
        integer flags took thousands of digits.  Each is one line on stderr, exit 2."""
        wait = ["wait", "--nodelist", "n1", "--num-training-nodes", "0", "--hostlist-backend", "python"]
        digits = "7" * 5000
        cases = [(wait + ["--timeout", "nan"], "--timeout="), (wait + ["--timeout", "inf"], "--timeout="),
                 (wait + ["--timeout", "1e999"], "--timeout="),
                 (wait + ["--timeout=1", "--interval", "NaN"], "--interval="),
                 (wait + ["--timeout=1", "--probe-timeout=-inf"], "--probe-timeout="),
                 (wait + ["--timeout=1", "--interval", "١"], "--interval="),
                 (wait + ["--timeout=1", "--min-healthy", digits], "--min-healthy="),
                 (["stub-server", "--latency", "nan"], "--latency="),
                 (["stub-server", "--latency=-1"], "--latency="),
                 (["stub-server", "--fail-rate", "nan"], "--fail-rate="),
                 (["stub-server", "--fail-rate", "inf"], "--fail-rate="),
                 (["stub-server", "--fail-rate", "1.5"], "--fail-rate="),
                 (["stub-server", "--keep-alive-timeout", "inf"], "--keep-alive-timeout="),
                 (["stub-server", "--fail-status", "600"], "--fail-status="),
                 (["stub-server", "--fail-status", digits], "--fail-status="),
                 (["stub-server", "--die-after", digits], "--die-after="),
                 (["stub-server", "--host", "a b"], "--host="),
                 (["demo", "--requests", digits], "--requests=")]
        for argv, fragment in cases:
            with self.subTest(argv=" ".join(argv)[:80]):
                code, out, err = run_cli(*argv, env={})
                self.assertEqual((code, out), (2, ""), err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertIn(fragment, err)
                self.assertLess(len(err), 300)


class PortBlocks(unittest.TestCase):
    """The one port picker of the demo, the tests and the benchmarks: below the ephemeral range."""

    def test_a_block_is_consecutive_free_and_below_the_ephemeral_range(self):
        low, high = a.ephemeral_port_range()
        self.assertLess(low, high)
        socks = a.reserve_port_block(5)
        try:
            ports = [s.getsockname()[1] for s in socks]
            self.assertEqual(ports, list(range(ports[0], ports[0] + 5)))
            self.assertLessEqual(ports[-1], low - 1)
        finally:
            for sock in socks:
                sock.close()

    def test_the_preferred_block_when_free_else_another(self):
        base = a.free_port_block(3)
        self.assertEqual(a.free_port_block(3, preferred=base), base)
        held = a.reserve_port_block(1, preferred=base + 1)
        try:
            self.assertEqual(held[0].getsockname()[1], base + 1)
            other = a.free_port_block(3, preferred=base)  # base + 1 is taken: a block elsewhere
            self.assertNotEqual(other, base)
        finally:
            held[0].close()


class CLIEdges(unittest.TestCase):
    def test_a_closed_stdout_ends_quietly(self):
        """Issue 10 item 18: ``discover | head -1`` with many URLs: no traceback, the status of a
        tool stopped by SIGPIPE (141)."""
        proc = subprocess.Popen([sys.executable, "-m", "atropos_slurm", "discover", "--nodelist", "n[1-20000]",
                                 "--num-training-nodes", "0", "--hostlist-backend", "python"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE,
                                env=dict(os.environ, PYTHONPATH=HERE))
        first = proc.stdout.readline()
        proc.stdout.close()  # as head -1 does: 20,000 URLs do not fit in the pipe
        err = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertEqual(proc.wait(60), 141, err)
        self.assertEqual(first, b"http://n1:9000/v1\n")
        self.assertEqual(err, "")

    def test_demo_writes_whole_lines_when_not_on_a_terminal_and_names_the_stopped_server_by_url(self):
        """Issue 10 item 18: redirected to a file, every progress line ends in a newline (no
        carriage returns), and the stopped server is named by a URL of the table."""
        out = io.StringIO()
        rows = asyncio.run(a.run_demo(requests=400, servers=4, out=out))
        text = out.getvalue()
        self.assertNotIn("\r", text)
        self.assertTrue(text.endswith("\n"))
        lines = text.splitlines()
        progress = [line for line in lines if " done, " in line]
        self.assertTrue(progress, text)
        self.assertTrue(all(line.startswith("demo: ") for line in progress), text)
        stopped = [line for line in lines if "stopping" in line]
        self.assertEqual(len(stopped), 1, text)
        self.assertIn(stopped[0].split()[2], [row["url"] for row in rows], text)
        self.assertEqual(stopped[0], f"demo: stopping {rows[2]['url']} half way")


class Packaging(unittest.TestCase):
    """``pip install .`` into a fresh venv gives working console scripts."""

    def test_pip_install_in_fresh_venv(self):
        if os.environ.get("ATROPOS_TEST_SKIP_PACKAGING"):
            raise unittest.SkipTest("ATROPOS_TEST_SKIP_PACKAGING is set")
        with tempfile.TemporaryDirectory() as tmp:
            venv = os.path.join(tmp, "venv")
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
            pip = os.path.join(venv, "bin", "pip")
            src = os.path.join(tmp, "src")
            shutil.copytree(HERE, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build",
                                                                     "wandb", "bench", "tests"))
            proc = subprocess.run([pip, "install", "-q", src], capture_output=True, text=True, timeout=300)
            self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
            env = dict(os.environ, SLURM_JOB_NODELIST="a,b[1-2]", NUM_TRAINING_NODES="1", INFER_TP="4",
                       **{a.ENV_HOSTLIST_BACKEND: "python"})
            env.pop("PYTHONPATH", None)
            proc = subprocess.run([os.path.join(venv, "bin", "atropos-slurm"), "discover"], capture_output=True,
                                  text=True, env=env, cwd=tmp, timeout=60)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertEqual(proc.stdout.split(), [f"http://b{k}:{9000 + i}/v1" for k in (1, 2) for i in (0, 1)])
            proc = subprocess.run([os.path.join(venv, "bin", "inference-node-wandb-watcher"), "--help"],
                                  capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("--api_addr", proc.stdout)


if __name__ == "__main__":
    unittest.main()
