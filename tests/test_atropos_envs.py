"""Atropos' own ``BaseEnv`` (atroposlib 0.4.0) on our ``ServerManager``, with Atropos' manager as the control.

Small environments written the way Atropos' are (``tests/atropos/tiny_envs.py``: chat with
``split="eval"``, completion, ``dedicated_server`` multi-turn) run through real ``BaseEnv``
code after ``patch_atropos()``: ``collect_trajectories``, ``evaluate``, ``wandb_log`` (real
wandb, offline), ``update_weight`` through ``get_status`` (a trainer API on loopback),
Atropos' ``process`` subcommand end to end, writing groups to a file, its ``evaluate``
subcommand (``metrics.json``, ``samples.jsonl``), and ``serve`` feeding
Atropos' real trainer API (``run-api``) batches.  Each runs a second time
on Atropos' own manager, and the two are compared: the same shapes, the same requests seen
by the server (``RecordingStub``, the module's stub server on loopback).  Atropos' manager is
compared with health checks off, since its health check is a generation request of its own.

These tests need atroposlib, which lives in its own venv (``bash tests/atropos/setup.sh``,
``/opt/atropos-env-venv``).  Run with another Python (the README's ``python -m pytest -q``),
this file holds one test that runs the file with the venv's Python and checks that all of it
passed, so that the README's command covers it.

Run: ``/opt/atropos-env-venv/bin/python -m pytest -q tests/test_atropos_envs.py``.
"""

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "atropos"))

import support  # noqa: E402
import atropos_slurm as a  # noqa: E402

VENV = os.environ.get("ATROPOS_VENV", "/opt/atropos-env-venv")
MESSAGES = [{"role": "user", "content": "hello world"}]

if importlib.util.find_spec("atroposlib") is None:

    class InAtroposVenv(unittest.TestCase):
        def test_the_environment_tests_pass_in_the_atropos_venv(self):
            python = os.path.join(VENV, "bin", "python")
            support.require("atroposlib", os.access(python, os.X_OK),
                            f"bash tests/atropos/setup.sh makes the venv {VENV} (or set ATROPOS_VENV)")
            result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                                     os.path.abspath(__file__)], cwd=ROOT, capture_output=True, text=True,
                                    timeout=900)
            lines = result.stdout.strip().splitlines()
            tail = "\n".join(lines[-30:]) + "\n" + result.stderr[-2000:]
            self.assertEqual(result.returncode, 0, tail)
            self.assertRegex(lines[-1], r"^=* ?\d+ passed", tail)
            self.assertNotRegex(lines[-1], r"failed|skipped|error", tail)

else:
    import atroposlib.envs.base as atropos_base
    import atroposlib.envs.server_handling.server_manager as atropos_server_manager
    import wandb
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig, ReasoningConfig

    import tiny_envs

    ATROPOS_MANAGER = atropos_server_manager.ServerManager  # kept before patching, for the control runs
    NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    a.patch_atropos()
    KINDS = ("ours", "atropos")
    TMP = tempfile.TemporaryDirectory(prefix="atropos-envs-")
    ENV = {"TINY_TOKENIZER_DIR": os.path.join(TMP.name, "tokenizer"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": os.path.join(TMP.name, "wandb"), "WANDB_CACHE_DIR": os.path.join(TMP.name, "wandb-cache"),
           "TMPDIR": TMP.name, "TOKENIZERS_PARALLELISM": "false"}

    def setUpModule():
        os.makedirs(ENV["WANDB_DIR"])
        patcher = mock.patch.dict(os.environ, ENV)
        patcher.start()
        unittest.addModuleCleanup(patcher.stop)
        tiny_envs.make_tokenizer(ENV["TINY_TOKENIZER_DIR"])
        loop = support.LoopThread().__enter__()
        unittest.addModuleCleanup(loop.__exit__)
        global LOOP, STUBS
        LOOP = loop
        STUBS = [loop.start_stub(stub_class=support.RecordingStub) for _ in range(2)]

    def url(stub) -> str:
        return f"http://127.0.0.1:{stub.port}/v1"

    @contextlib.contextmanager
    def manager_of(kind):
        """BaseEnv builds ours (patched) or, for the control, Atropos' own manager."""
        with mock.patch.object(atropos_base, "ServerManager", a.ServerManager if kind == "ours" else ATROPOS_MANAGER):
            yield

    def make_env(cls, kind, stubs=None, **config):
        env_config, server_configs = cls.config_init()
        env_config = env_config.model_copy(update=config)
        server_configs = [server_configs[0].model_copy(update={"base_url": url(s)}) for s in stubs or STUBS[:1]]
        with manager_of(kind):
            env = cls(env_config, server_configs, slurm=False, testing=False)
        expected = a.ServerManager if kind == "ours" else ATROPOS_MANAGER
        assert type(env.server) is expected, type(env.server)
        return env

    def seen(stubs=None):
        """The requests the stubs got since the last call, in a canonical order; then forgotten."""
        requests = []
        for stub in stubs or STUBS:
            requests += [json.dumps(r, sort_keys=True) for r in stub.requests]
            stub.requests.clear()
        return sorted(requests)

    def bodies(requests):
        return [json.loads(r)[1] for r in requests]

    def shape(group):
        """What a trainer reads of a group: keys, sizes, and the data itself (it is deterministic)."""
        return {k: v for k, v in group.items() if v not in (None, [], {})}

    class Environments(unittest.TestCase):
        def run_env(self, cls, kind, **config):
            env = make_env(cls, kind, **config)

            async def main():
                await env.setup()
                group, backlog = await env.collect_trajectories(await env.get_next_item())
                await env.evaluate()
                return group, backlog

            group, backlog = asyncio.run(main())
            self.assertEqual(backlog, [])
            self.assertEqual(len(group["tokens"]), config.get("group_size", 4))
            for tokens, masks in zip(group["tokens"], group["masks"]):
                self.assertEqual(len(tokens), len(masks))
                self.assertTrue(any(m != -100 for m in masks) and masks[0] == -100)
            return env, group

        def compare(self, cls, **config):
            results = {}
            for kind in KINDS:
                env, group = self.run_env(cls, kind, **config)
                results[kind] = (shape(group), seen())
            self.assertEqual(results["ours"][0], results["atropos"][0], "the same group")
            self.assertEqual(results["ours"][1], results["atropos"][1], "the same requests on the wire")
            return results["ours"]

        def test_chat_with_n_over_max_n_completions_and_eval_split(self):
            group, requests = self.compare(tiny_envs.ChatEnv, group_size=12)
            bodies_ = bodies(requests)
            self.assertEqual(sorted(b["n"] for b in bodies_), [1, 1, 1, 4, 8], "12 split as 8 + 4; 3 eval calls")
            self.assertTrue(all(b["model"] == "tiny" and "split" not in b for b in bodies_))
            self.assertEqual(len(group["messages"]), 12)

        def test_completion(self):
            group, requests = self.compare(tiny_envs.CompletionEnv)
            self.assertEqual([b.get("prompt") for b in bodies(requests)].count("Question: hello world\nAnswer:"), 1)

        def test_dedicated_server_multi_turn(self):
            group, requests = self.compare(tiny_envs.DedicatedEnv)
            self.assertEqual(len(requests), 4 * 3 + 3, "4 episodes of 3 turns, and the eval calls")
            self.assertEqual(len(group["messages"][0]), 6)

        def test_each_episode_keeps_its_server(self):
            for kind in KINDS:
                with self.subTest(kind):
                    env = make_env(tiny_envs.DedicatedEnv, kind, stubs=STUBS, group_size=6)

                    async def main():
                        await env.setup()
                        return await env.collect_trajectories(await env.get_next_item())

                    group, _ = asyncio.run(main())
                    for messages in group["messages"]:
                        replies = {m["content"] for m in messages if m["role"] == "assistant"}
                        self.assertEqual(len(replies), 1, f"one server per episode: {replies}")
                    seen()

        def test_update_weight_through_get_status(self):
            trainer = support.TrainerAPIStub()
            self.addCleanup(trainer.go_away)
            trainer.set(env_weight=0.25)
            caps = {}
            for kind in KINDS:
                env = make_env(tiny_envs.ChatEnv, kind, rollout_server_url=trainer.url)
                env.env_id = 0
                asyncio.run(env.get_status())
                server = env.server.servers[0]
                if kind == "ours":
                    caps[kind] = (server.slot.caps["train"], server.slot.caps["eval"])
                else:  # Atropos' weighted semaphores admit max_val * weight calls, rounded up
                    caps[kind] = tuple(round(s.max_val - s.min_val(), 9) for s in (server.sem, server.eval_sem))
                self.assertEqual(env.status_dict["env_weight"], 0.25)
            self.assertEqual(caps["ours"], (2, 1), "ceil(8 * 0.25), ceil(4 * 0.25)")
            self.assertEqual(caps["atropos"], (2.0, 1.0))
            self.assertGreaterEqual(trainer.hits["/status-env"], 2)
            env, group = self.run_env(tiny_envs.ChatEnv, "ours")  # and calls go on at the new caps
            seen()

        def test_wandb_log_offline(self):
            logged = {}
            run = wandb.init(project="tiny-envs", mode="offline", dir=ENV["WANDB_DIR"])
            self.addCleanup(run.finish)
            for kind in KINDS:
                env, _ = self.run_env(tiny_envs.ChatEnv, kind, use_wandb=True)
                with mock.patch.object(wandb, "log", wraps=wandb.log) as spy:
                    asyncio.run(env.wandb_log({}))
                logged[kind] = spy.call_args[0][0]
                seen()
            server_keys = {k: {m for m in logged[k] if m.startswith("server/")} for k in KINDS}
            self.assertEqual(server_keys["atropos"], {"server/server_0_request_time_avg",
                                                      "server/server_0_request_time_std",
                                                      "server/server_0_request_time_99p",
                                                      "server/server_0_average_num_attempts"})
            # Atropos' manager drops split before its server sees it: its eval calls count as train.
            self.assertEqual(server_keys["ours"] - server_keys["atropos"],
                             {"server/server_0_eval_request_time_avg", "server/server_0_eval_request_time_std",
                              "server/server_0_eval_request_time_99p", "server/server_0_eval_retry_rate"})
            self.assertEqual(logged["ours"]["server/server_0_average_num_attempts"], 1.0)
            self.assertEqual(logged["ours"]["eval/percent_correct"], logged["atropos"]["eval/percent_correct"])

    class Patching(unittest.TestCase):
        def test_patch_is_idempotent_and_reaches_later_imports(self):
            a.patch_atropos()
            a.patch_atropos()
            import atroposlib.envs.eval as atropos_eval  # imports ServerManager from server_manager

            for module in (atropos_base, atropos_server_manager, atropos_eval):
                self.assertIs(module.ServerManager, a.ServerManager, module.__name__)
            self.assertIs(atropos_base.APIServerConfig, APIServerConfig, "Atropos' pydantic configs stay")

        def test_base_env_construction_in_a_job_runs_scontrol_once(self):
            env_config, server_configs = tiny_envs.ChatEnv.config_init()
            job = {"SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1", "ATROPOS_SLURM_GPUS_PER_NODE": "2"}
            with tempfile.TemporaryDirectory() as tmp, support.counting_scontrol(tmp) as runs, \
                    mock.patch.dict(os.environ, job):
                env = tiny_envs.ChatEnv(env_config, server_configs, slurm=True, testing=False)
                self.assertEqual([s.url for s in env.server.servers],
                                 [f"http://n{n}:{p}/v1" for n in (2, 3) for p in (9000, 9001)])
                self.assertEqual(len(runs()), 1, runs())

    class CallsOnTheWire(unittest.TestCase):
        """Manager calls as environments make them, ours and Atropos', compared request by request."""

        def calls(self, manager_class, reasoning):
            config = APIServerConfig(model_name="tiny", base_url=url(STUBS[0]), api_key="x", health_check=False)
            manager = manager_class([config], reasoning_config=reasoning)

            async def main():
                return [
                    await manager.chat_completion(messages=MESSAGES, n=2, max_tokens=5, extra_body={"top_k": 5},
                                                  timeout=30),
                    await manager.chat_completion(messages=MESSAGES, skip_reasoning=True,
                                                  extra_body={"reasoning": {"enabled": False}}),
                    await manager.chat_completion(messages=MESSAGES, split="validation", temperature=0.0),
                    await manager.completion(prompt="hello", max_tokens=3, split="eval"),
                    await manager.chat_completion(messages=MESSAGES, n=12),
                ]
            return asyncio.run(main()), seen()

        def test_requests_and_responses_match_atropos(self):
            for reasoning in (ReasoningConfig(), ReasoningConfig(enabled=True), ReasoningConfig(effort="high"),
                              ReasoningConfig(max_tokens=2048)):
                with self.subTest(reasoning=reasoning):
                    ours, ours_seen = self.calls(a.ServerManager, reasoning)
                    theirs, theirs_seen = self.calls(ATROPOS_MANAGER, reasoning)
                    self.assertEqual(ours_seen, theirs_seen)
                    for mine, control in zip(ours[:4], theirs[:4]):
                        self.assertEqual(drop_ids(mine.model_dump(exclude_none=True)),
                                         drop_ids(control.model_dump(exclude_none=True)))
                        self.assertIsNone(mine.choices[0].logprobs)
                    self.assertIsNone(ours[0].choices[0].message.tool_calls)
                    self.assertIsNone(theirs[0].choices[0].message.tool_calls)
                    self.assertEqual(len(ours[4].choices), len(theirs[4].choices), 12)
                    self.assertEqual([c.index for c in ours[4].choices], list(range(12)))
                    self.assertEqual([c.index for c in theirs[4].choices], list(range(8)) + list(range(4)))
            sent = bodies(ours_seen)
            self.assertTrue(any(b.get("reasoning") == {"enabled": True, "max_tokens": 2048} for b in sent))
            self.assertTrue(all("timeout" not in b and "skip_reasoning" not in b for b in sent))

    def drop_ids(data):
        return {k: v for k, v in data.items() if k not in ("id", "created")}

    class ProcessSubcommand(unittest.TestCase):
        """``python ENV.py process|evaluate`` as Atropos documents them, and the same through ``run-env``."""

        def subcommand(self, script, kind, name, *flags, stub=None):
            command = [sys.executable, os.path.join(ROOT, "tests", "atropos", script), name]
            if kind == "ours":
                command[1:2] = ["-m", "atropos_slurm", "run-env", command[1]]
            command += ["--openai.health_check", "false", *flags]
            if stub is not None:
                command += ["--openai.base_url", url(stub)]
            env = dict(os.environ, PYTHONPATH=ROOT)
            return subprocess.run(command, cwd=TMP.name, env=env, capture_output=True, text=True, timeout=300)

        def process(self, script, kind, out, *flags, stub=None):
            return self.subcommand(script, kind, "process", "--env.data_path_to_save_groups", out,
                                   "--env.total_steps", "2", "--env.group_size", "3", *flags, stub=stub)

        def groups(self, path):
            with open(path) as f:
                return [json.loads(line) for line in f]

        def test_process_writes_the_same_groups(self):
            for script in ("chat_env.py", "dedicated_env.py"):
                outputs = {}
                for kind in KINDS:
                    out = os.path.join(TMP.name, f"{kind}-{script}.jsonl")
                    result = self.process(script, kind, out, stub=STUBS[0])
                    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
                    outputs[kind] = (self.groups(out), seen())
                with self.subTest(script):
                    groups, requests = outputs["ours"]
                    self.assertEqual(len(groups), 2)
                    for group in groups:
                        self.assertEqual(len(group["tokens"]), 3)
                        self.assertEqual([len(t) for t in group["tokens"]], [len(m) for m in group["masks"]])
                    self.assertEqual(groups, outputs["atropos"][0], "the same groups, token for token")
                    self.assertEqual(requests, outputs["atropos"][1], "the same requests")

        def test_managed_env_process_against_stub_server_with_server_type_vllm(self):
            """A managed_server environment (gsm8k_server's pattern) in Atropos' ``process`` mode,
            through ``python -m atropos_slurm run-env``, against ``stub-server`` (its Atropos
            ``/generate``; with ``--no-generate`` a 404 there, then vLLM's ``/v1/completions``) and
            with ``--testing true``: every group's completion ids and logprobs are the stub's, the
            same in the three runs; and inside the environment the manager is the module's own
            class, whose errors ``except atropos_slurm.AtroposSlurmError`` catches."""
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ENV["TINY_TOKENIZER_DIR"])
            runs = {}
            for run in ("stub-server", "stub-server --no-generate", "testing"):
                flags = ["--testing", "true"]
                if run != "testing":
                    proc, port = support.spawn_stub_server(1, *run.split()[1:])
                    self.addCleanup(support.stop_process, proc)
                    flags = ["--openai.base_url", f"http://127.0.0.1:{port}/v1"]
                out, marker = (os.path.join(TMP.name, f"managed-{len(runs)}.{ext}") for ext in ("jsonl", "json"))
                command = [sys.executable, "-m", "atropos_slurm", "run-env",
                           os.path.join(ROOT, "tests", "atropos", "one_copy_env.py"), "process",
                           "--env.data_path_to_save_groups", out, "--env.total_steps", "2", "--env.group_size", "3",
                           "--openai.server_type", "vllm", "--openai.health_check", "false", *flags]
                result = subprocess.run(command, cwd=TMP.name, env=dict(os.environ, PYTHONPATH=ROOT, ONE_COPY_OUT=marker),
                                        capture_output=True, text=True, timeout=300)
                with self.subTest(run):
                    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
                    self.assertNotIn("Traceback", result.stderr)
                    with open(marker) as f:
                        checks = [json.loads(line) for line in f]
                    self.assertEqual(len(checks), 2)
                    self.assertEqual(checks[0], {"manager": "atropos_slurm.ServerManager", "own_class": True,
                                                 "caught": "ConfigError"})
                    groups = self.groups(out)
                    self.assertEqual(len(groups), 2)
                    for group, question in zip(groups, tiny_envs.QUESTIONS):
                        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
                        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                                add_generation_prompt=True))
                        want = a.StubTokens.outputs(prompt, 3, 8)
                        for c, (tokens, masks, logprobs) in enumerate(zip(group["tokens"], group["masks"],
                                                                          group["inference_logprobs"])):
                            self.assertEqual(tokens, prompt + [t for t, _ in want[c]])
                            self.assertEqual(masks, [-100] * len(prompt) + [t for t, _ in want[c]])
                            self.assertEqual(logprobs, [1.0] * len(prompt) + [lp for _, lp in want[c]])
                    runs[run] = groups
            self.assertEqual(runs["stub-server"], runs["stub-server --no-generate"])
            self.assertEqual(runs["stub-server"], runs["testing"])

        def test_testing_mode(self):
            out = os.path.join(TMP.name, "testing.jsonl")
            result = self.process("chat_env.py", "ours", out, "--testing", "true")
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            groups = self.groups(out)
            self.assertEqual([len(g["tokens"]) for g in groups], [3, 3])
            self.assertTrue(all(re.match(r"stub reply from", m[-1]["content"]) for g in groups for m in g["messages"]))
            out = os.path.join(TMP.name, "testing-atropos.jsonl")
            result = self.process("chat_env.py", "atropos", out, "--testing", "true")
            self.assertNotEqual(result.returncode, 0, "Atropos' harness cannot serve its own manager's calls")
            self.assertIn("AttributeError: 'Semaphore' object has no attribute 'max_val'", result.stderr)
            self.assertFalse(os.path.exists(out) and os.path.getsize(out))

        def test_evaluate_writes_the_same_metrics_and_samples(self):
            """``evaluate``: ``setup`` then ``evaluate`` (``split="eval"`` calls), whose
            ``evaluate_log`` writes metrics.json and samples.jsonl; Atropos' manager the control."""
            outputs = {}
            for kind in KINDS:
                out = os.path.join(TMP.name, f"evals-{kind}")
                result = self.subcommand("chat_env.py", kind, "evaluate", "--env.data_dir_to_save_evals", out,
                                         stub=STUBS[0])
                self.assertEqual(result.returncode, 0, result.stderr[-3000:])
                self.assertNotIn("Traceback", result.stderr)
                with open(os.path.join(out, "metrics.json")) as f:
                    metrics = json.load(f)
                self.assertGreaterEqual(float(metrics["config_general"].pop("total_evaluation_time_seconds")), 0)
                outputs[kind] = (metrics, self.groups(os.path.join(out, "samples.jsonl")), seen(),
                                 os.path.exists(os.path.join(out, "evaluate_config.yaml")))
            metrics, samples, requests, config_dumped = outputs["ours"]
            self.assertEqual(metrics, {
                "config_general": {"model_name": "tiny",
                                   "generation_parameters": {"max_new_tokens": 512, "temperature": 0.0,
                                                             "max_tokens": 8}},
                "results": {"atropos|tiny_chat_eval|0": {"eval/percent_correct": 1.0},
                            "all": {"eval/percent_correct": 1.0}}})
            self.assertEqual([s["messages"][0]["content"] for s in samples], tiny_envs.QUESTIONS[:3])
            for sample in samples:
                self.assertRegex(sample["messages"][1]["content"], r"^stub reply from")
                self.assertEqual(sample["score"], 1.0)
            self.assertEqual(len(requests), 3)
            for body in bodies(requests):
                self.assertEqual((body["n"], body["max_tokens"], body["temperature"]), (1, 8, 0.0))
                self.assertNotIn("split", body)
            self.assertTrue(config_dumped)
            self.assertEqual(outputs["ours"], outputs["atropos"], "the same metrics, samples and requests")

    class ServeSubcommand(unittest.TestCase):
        """``serve`` against Atropos' real trainer API (``atroposlib.cli.run_api``) and a trainer
        that registers and takes batches: ``BaseEnv`` polls ``/status-env`` (``update_weight``),
        logs to W&B (offline) with the servers' metrics, and sends scored groups."""

        def api(self, port, method, path, body=None):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with NO_PROXY.open(request, timeout=10) as response:
                return json.loads(response.read())

        def serve(self, kind):
            port = support.free_port_block(1)
            log = open(os.path.join(TMP.name, f"serve-{kind}.log"), "w")
            self.addCleanup(log.close)
            api = subprocess.Popen([sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=TMP.name)
            self.addCleanup(support.stop_process, api)
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.api(port, "GET", "/")
                    break
                except OSError:
                    self.assertLess(time.monotonic(), deadline, "run-api did not come up")
                    time.sleep(0.2)
            self.api(port, "POST", "/register", {
                "wandb_group": "g", "wandb_project": "tiny-serve", "batch_size": 8, "max_token_len": 2048,
                "checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 10})
            self.api(port, "GET", "/batch")  # the trainer has started
            command = [sys.executable, os.path.join(ROOT, "tests", "atropos", "chat_env.py"), "serve",
                       "--env.rollout_server_url", f"http://127.0.0.1:{port}", "--env.use_wandb", "true",
                       "--env.total_steps", "10", "--openai.base_url", url(STUBS[0]), "--openai.health_check", "false"]
            if kind == "ours":
                command[1:2] = ["-m", "atropos_slurm", "run-env", command[1]]
            env = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=TMP.name,
                                   env=dict(os.environ, PYTHONPATH=ROOT))
            self.addCleanup(support.stop_process, env)
            batches, deadline = [], time.monotonic() + 180
            while len(batches) < 2:
                self.assertIsNone(env.poll(), f"the environment exited; see {log.name}")
                self.assertLess(time.monotonic(), deadline, f"no batches within 180 s; see {log.name}")
                batch = self.api(port, "GET", "/batch")["batch"]
                if batch:
                    batches.append(batch)
                else:
                    time.sleep(0.3)
            status = self.api(port, "GET", "/status")
            support.stop_process(env)
            log.flush()
            with open(log.name) as f:
                output = f.read()
            self.assertNotIn("Traceback", output)
            self.assertIn('"GET /status-env HTTP/1.1" 200', output, "get_status ran (update_weight)")
            return batches, status

        def test_serve_feeds_a_trainer(self):
            for kind in KINDS:
                with self.subTest(kind):
                    batches, status = self.serve(kind)
                    self.assertGreaterEqual(status["current_step"], 2)
                    for batch in batches:
                        sequences = [t for group in batch for t in group["tokens"]]
                        self.assertEqual(len(sequences), 8)
                        for group in batch:
                            self.assertEqual(len(group["tokens"]), 4)
                            for tokens, masks in zip(group["tokens"], group["masks"]):
                                self.assertEqual(len(tokens), len(masks))
                                self.assertEqual(masks[0], -100)
                    seen()


if __name__ == "__main__":
    unittest.main()
