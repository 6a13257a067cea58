"""Tests of the Atropos compatibility layer that need no atroposlib (standard library only).

What Atropos' own code does with it (real ``BaseEnv``, Atropos' manager as the control, the
requests compared on the wire) is in ``tests/test_atropos_envs.py``, which runs in the Atropos
venv; here: the constructor's arguments, request bodies, responses, ``update_weight``,
``wandb_metrics``, ``dedicated_server``, ``testing=True`` and ``run-env``, against real stub
servers on loopback.

Run: ``python -m pytest tests/test_atropos_compat.py -q``.
"""

import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import support  # noqa: E402
from support import AsyncCase, RecordingStub, run_module, stub_url  # noqa: E402
import atropos_slurm as a  # noqa: E402
from atropos_slurm import APIServerConfig, ServerBaseline, ServerManager  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]


class AtroposLike:
    """An object shaped like Atropos' pydantic configs (attributes only), with an extra field."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class Case(AsyncCase):
    async def stub(self, **kwargs):
        stub = await RecordingStub(**kwargs).start()
        self.addAsyncCleanup(stub.stop)
        return stub

    def manager(self, stubs, cap=8, eval_cap=8, config=None, **kwargs):
        configs = [APIServerConfig(base_url=stub_url(s), model_name="m",
                                   num_max_requests_at_once=cap, num_requests_for_eval=eval_cap,
                                   **(config or {})) for s in stubs]
        manager = ServerManager(configs, **kwargs)
        self.addAsyncCleanup(manager.close)
        return manager


# =============================================================================================
# What is sent: the openai SDK's semantics, as Atropos' servers call it
# =============================================================================================


class RequestBodies(unittest.TestCase):
    def server(self, url="http://127.0.0.1:9/v1", reasoning=None):
        return a.OpenAIServer(APIServerConfig(base_url=url, model_name="cfg-model"), reasoning_config=reasoning)

    def test_options_are_not_sent_and_extra_body_is_merged_last(self):
        body = self.server().request_body("/chat/completions", dict(
            messages=MESSAGES, model="caller", split="eval", timeout=3, skip_reasoning=True, ignore_eos=True,
            top_k=1, extra_body={"top_k": 5, "min_p": 0.1}))
        self.assertEqual(body, {"messages": MESSAGES, "model": "cfg-model", "ignore_eos": True, "top_k": 5,
                                "min_p": 0.1})

    def test_unsupported_client_options_are_refused(self):
        for option in ("extra_headers", "extra_query"):
            with self.assertRaisesRegex(a.ConfigError, option):
                self.server().request_body("/completions", {"prompt": "x", option: {"a": "b"}})
        with self.assertRaisesRegex(a.ConfigError, "extra_body"):
            self.server().request_body("/completions", {"prompt": "x", "extra_body": [1]})

    def test_token_calls_refuse_the_same_client_options_before_sending(self):
        """Token calls build their own bodies (/generate): an ``extra_headers`` passed through
        reached Atropos' server as a body key, which answers 500, and the server was marked down."""
        config = APIServerConfig(base_url=f"http://127.0.0.1:{support.closed_port()}/v1", model_name="m",
                                 server_type="vllm")

        async def calls():
            manager = a.ServerManager([config], routing="round_robin")
            try:
                for option, value in (("extra_headers", {"X-A": "b"}), ("extra_query", {"a": "b"}),
                                      ("extra_body", [1])):
                    with self.subTest(option=option), self.assertRaisesRegex(a.ConfigError, option):
                        await manager.tokens_and_logprobs_completion(input_ids=[1, 2], max_tokens=2, **{option: value})
                return manager.stats()
            finally:
                await manager.close()

        stats = asyncio.run(calls())
        self.assertTrue(all(row["healthy"] for row in stats), "a caller's mistake marks nothing down")
        self.assertEqual(sum(row["done"] + row["failed"] for row in stats), 0, "nothing was sent")

    def test_reasoning_goes_into_chat_bodies_only_unless_skipped(self):
        reasoning = AtroposLike(enabled=True, effort="high", max_tokens=None)
        server = self.server(reasoning=reasoning)
        chat = server.request_body("/chat/completions", {"messages": MESSAGES, "extra_body": {"reasoning": 1, "x": 2}})
        self.assertEqual(chat["reasoning"], {"enabled": True, "effort": "high"}, "ours win over the caller's")
        self.assertEqual(chat["x"], 2)
        self.assertNotIn("reasoning", server.request_body("/completions", {"prompt": "p"}))
        self.assertNotIn("reasoning", server.request_body("/chat/completions",
                                                          {"messages": MESSAGES, "skip_reasoning": True}))

    def test_reasoning_shapes(self):
        cases = [
            (AtroposLike(enabled=False, effort=None, max_tokens=None), "http://h/v1", None),
            (AtroposLike(enabled=True, effort=None, max_tokens=None), "http://h/v1", {"reasoning": {"enabled": True}}),
            (AtroposLike(enabled=False, effort=None, max_tokens=4096), "http://h/v1",
             {"reasoning": {"enabled": True, "max_tokens": 4096}}),
            (AtroposLike(enabled=True, effort="low", max_tokens=4096), "http://h/v1",
             {"reasoning": {"enabled": True, "effort": "low"}}),
            (AtroposLike(enabled=True, effort=None, max_tokens=None), "https://api.openai.com/v1",
             {"reasoning_effort": "medium"}),
            (None, "http://h/v1", None),
        ]
        for reasoning, url, expected in cases:
            with self.subTest(reasoning=vars(reasoning) if reasoning else None, url=url):
                self.assertEqual(a.reasoning_extra_body(reasoning, url), expected)
        with self.assertRaisesRegex(a.ConfigError, "'huge'"):
            a.reasoning_extra_body(AtroposLike(enabled=True, effort="huge", max_tokens=None), "http://h/v1")

    def test_openai_reasoning_models_get_temperature_1_and_max_completion_tokens(self):
        server = self.server("https://api.openai.com/v1", AtroposLike(enabled=True, effort="low", max_tokens=None))
        body = server.request_body("/chat/completions", {"messages": MESSAGES, "temperature": 0.2, "max_tokens": 9})
        self.assertEqual(body, {"messages": MESSAGES, "model": "cfg-model", "temperature": 1.0,
                                "max_completion_tokens": 9, "reasoning_effort": "low"})


class CallsOnTheWire(Case):
    async def test_per_call_timeout_bounds_the_call_and_is_not_sent(self):
        stub = await self.stub(latency=5)
        manager = self.manager([stub], max_retries=0)
        with self.assertRaisesRegex(a.ServerTimeoutError, "timeout=0.2 s"):
            await manager.chat_completion(messages=MESSAGES, timeout=0.2)
        fast = await self.stub()
        manager = self.manager([fast])
        await manager.completion(prompt="p", timeout=5, extra_body={"top_k": 3})
        self.assertEqual(fast.requests, [("/v1/completions", {"prompt": "p", "model": "m", "top_k": 3})])
        with self.assertRaisesRegex(a.ConfigError, "timeout=-1"):
            await manager.completion(prompt="p", timeout=-1)

    async def test_omitted_openai_fields_read_as_none_and_model_dump_is_plain_data(self):
        manager = self.manager([await self.stub()])
        chat = await manager.chat_completion(messages=MESSAGES, n=2)
        message = chat.choices[0].message
        self.assertEqual((message.tool_calls, message.refusal, message.function_call, chat.service_tier),
                         (None, None, None, None))
        self.assertIsNone(chat.choices[1].logprobs)
        with self.assertRaises(AttributeError):
            chat.choices[0].no_such_field
        dumped = chat.model_dump()
        self.assertIs(type(dumped), dict)
        self.assertIs(type(dumped["choices"][0]["message"]), dict)
        self.assertEqual(dumped, json.loads(chat.raw))
        self.assertNotIn("logprobs", chat.model_dump(exclude_none=True)["choices"][0])

    async def test_attribute_reads_agree_with_item_reads_for_every_field_name(self):
        """Before 3.12 the SDK's field names are class-level descriptors (speed); from 3.12 they go
        through ``__getattr__``.  Both read the same: present -> the value, absent optional -> None,
        absent otherwise -> AttributeError (so hasattr and getattr's default work)."""
        names = sorted(a._OPENAI_READ_FIELDS) + ["no_such_field"]
        full = a.AttrDict({name: [name] for name in names})
        empty = a.AttrDict()
        for name in names:
            with self.subTest(name=name):
                self.assertEqual(getattr(full, name), [name])
                if name in a.OPENAI_OPTIONAL_FIELDS:
                    self.assertIsNone(getattr(empty, name))
                else:
                    with self.assertRaisesRegex(AttributeError, name):
                        getattr(empty, name)
                    self.assertFalse(hasattr(empty, name))
                    self.assertEqual(getattr(empty, name, "default"), "default")
        self.assertEqual(full.get("choices"), ["choices"], "dict methods stay methods")
        self.assertEqual(sorted(a.APIResponse(full).keys()), sorted(names))

    async def test_split_other_than_train_is_eval(self):
        stub = await self.stub()
        manager = self.manager([stub])
        for split in ("train", "eval", "validation", "test"):
            await manager.chat_completion(messages=MESSAGES, split=split)
        self.assertEqual(manager.servers[0].stats.split_counts, {"train": [1, 0], "eval": [3, 0]})
        self.assertTrue(all("split" not in body for _, body in stub.requests))


# =============================================================================================
# Constructor parity with Atropos' ServerManager
# =============================================================================================


def atropos_class(name, bases=(object,)):
    """A class that says it is one of atroposlib's (module and name), for server_class mapping."""
    return type(name, bases, {"__module__": "atroposlib.envs.server_handling.server_baseline"})


class Constructor(unittest.TestCase):
    def test_atropos_configs_are_read_by_field_and_extra_fields_ignored(self):
        config = AtroposLike(timeout=30, num_max_requests_at_once=7, num_requests_for_eval=3, model_name="q",
                             rolling_buffer_length=10, server_type="vllm", tokenizer_name="none", api_key=None,
                             base_url="http://127.0.0.1:9/v1", n_kwarg_is_ignored=False, health_check=True, weight=2)
        manager = ServerManager(config)
        own = manager.servers[0].config
        self.assertIsInstance(own, APIServerConfig)
        self.assertEqual((own.timeout, own.num_max_requests_at_once, own.model_name, own.server_type, own.api_key),
                         (30, 7, "q", "vllm", ""))
        self.assertEqual(manager.slots.records[0].caps, {"train": 7, "eval": 3})
        self.assertEqual(manager.servers[0].config.model_name, "q")
        with self.assertRaisesRegex(a.ConfigError, "num_max_requests_at_once=0"):
            ServerManager([AtroposLike(model_name="q", base_url="http://h/v1", num_max_requests_at_once=0)])

    def test_every_keyword_base_env_passes(self):
        reasoning = AtroposLike(enabled=False, effort=None, max_tokens=None)
        manager = ServerManager([APIServerConfig(base_url="http://127.0.0.1:9/v1")], slurm=False, testing=False,
                                server_class=atropos_class("APIServer"), reasoning_config=reasoning,
                                tool_parser="hermes")
        self.assertIsInstance(manager.servers[0], a.OpenAIServer)
        self.assertEqual((manager.reasoning_config, manager.tool_parser), (reasoning, "hermes"))
        with self.assertRaisesRegex(a.ConfigError, "proxy"):
            ServerManager([APIServerConfig(base_url="http://h/v1")], proxy_url="http://proxy:9100")
        with mock.patch.dict(os.environ, {"ATROPOS_PROXY_URL": "http://proxy:9100"}):
            with self.assertRaisesRegex(a.ConfigError, "ATROPOS_PROXY_URL"):
                ServerManager([APIServerConfig(base_url="http://h/v1")])

    def test_atropos_server_classes_map_through_server_type(self):
        for name, server_type in (("OpenAIServer", "openai"), ("VLLMServer", "vllm"), ("SGLangServer", "sglang"),
                                  ("TrlVllmServer", "trl"), ("APIServer", "sglang")):
            with self.subTest(name):
                manager = ServerManager([APIServerConfig(base_url="http://h/v1", server_type="sglang")],
                                        server_class=atropos_class(name))
                self.assertEqual(manager.servers[0].config.server_type, server_type)
        own = atropos_class("VLLMServer")
        mine = type("MyServer", (own,), {"__module__": "my_env"})
        with self.assertRaisesRegex(a.ConfigError, "my_env.MyServer"):
            ServerManager([APIServerConfig(base_url="http://h/v1")], server_class=mine)
        with self.assertRaisesRegex(a.ConfigError, "ServerHarness"):
            ServerManager([APIServerConfig(base_url="http://h/v1")], server_class=atropos_class("ServerHarness"))

    def test_construction_runs_scontrol_once(self):
        """ServerManager(slurm=True) discovers once (the one-node rule counts nodes without scontrol)."""
        env = {"SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1", "ATROPOS_SLURM_HOSTLIST": "auto",
               "ATROPOS_SLURM_GPUS_PER_NODE": "2"}
        with tempfile.TemporaryDirectory() as tmp, support.counting_scontrol(tmp) as runs, \
                mock.patch.dict(os.environ, env):
            manager = ServerManager([APIServerConfig(base_url="http://given:1/v1")], slurm=True)
            self.assertEqual(len(manager.servers), 4)
            self.assertEqual(len(runs()), 1, runs())
            ServerManager(ServerBaseline())
            self.assertEqual(len(runs()), 2, "a lone baseline inside a job: one more discovery, one more run")
            with mock.patch.dict(os.environ, {"SLURM_JOB_NODELIST": "n1"}):
                ServerManager(ServerBaseline())
            self.assertEqual(len(runs()), 2, "a one-node job discovers nothing, and runs no scontrol")

    def test_implicit_discovery_rules(self):
        env = {"SLURM_JOB_NODELIST": "n[1-3]", "NUM_TRAINING_NODES": "1", "ATROPOS_SLURM_HOSTLIST": "python",
               "ATROPOS_SLURM_GPUS_PER_NODE": "2"}
        urls = ["http://n2:9000/v1", "http://n2:9001/v1", "http://n3:9000/v1", "http://n3:9001/v1"]
        with mock.patch.dict(os.environ, env):
            self.assertEqual([s.url for s in ServerManager(ServerBaseline()).servers], urls,
                             "a lone ServerBaseline discovers inside a job, slurm=False or not")
            listed = [APIServerConfig(base_url="http://given:1/v1")]
            self.assertEqual([s.url for s in ServerManager(listed).servers], ["http://given:1/v1"])
            self.assertEqual([s.url for s in ServerManager(listed, slurm=True).servers], urls)
        with mock.patch.dict(os.environ, dict(env, SLURM_JOB_NODELIST="n1")):
            self.assertEqual([s.url for s in ServerManager(ServerBaseline()).servers], a.LOCAL_DEFAULT_URLS,
                             "one node: Atropos' local default")
            self.assertEqual([s.url for s in ServerManager(listed, slurm=True).servers], ["http://given:1/v1"])
            with mock.patch.dict(os.environ, {"NUM_TRAINING_NODES": "0"}):
                self.assertEqual([s.url for s in ServerManager(listed, slurm=True).servers],
                                 ["http://n1:9000/v1", "http://n1:9001/v1"], "NUM_TRAINING_NODES=0: the node serves")
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual([s.url for s in ServerManager(ServerBaseline()).servers], a.LOCAL_DEFAULT_URLS)


class TestingMode(Case):
    async def test_testing_true_runs_on_an_in_process_stub(self):
        manager = ServerManager(ServerBaseline(model_name="tm", num_requests_for_eval=2), testing=True)
        self.addAsyncCleanup(manager.close)
        self.assertEqual(len(manager.servers), 1)
        self.assertTrue(manager.servers[0].url.startswith("http://127.0.0.1:"))
        chat = await manager.chat_completion(messages=MESSAGES, n=3, split="eval")
        self.assertEqual(len(chat.choices), 3)
        self.assertEqual(chat.model, "tm")
        text = await manager.completion(prompt="p")
        self.assertTrue(text.choices[0].text)
        other = ServerManager([APIServerConfig(base_url="http://127.0.0.1:9/v1")], testing=True)
        self.addAsyncCleanup(other.close)
        self.assertEqual(other.servers[0].url, manager.servers[0].url, "one stub per process")


# =============================================================================================
# Members BaseEnv calls: update_weight, wandb_metrics; dedicated_server
# =============================================================================================


class Weights(Case):
    def test_weighted_cap(self):
        self.assertEqual([a.weighted_cap(10, w) for w in (0, 0.01, 0.3, 0.5, 1, 1.5)], [0, 1, 3, 5, 10, 15])
        self.assertEqual(a.weighted_cap(512, 0.01), 6)

    async def test_update_weight_scales_caps_and_frees_waiting_calls_at_once(self):
        stub = await self.stub(latency=0.3)
        manager = self.manager([stub], cap=8, eval_cap=4)
        await manager.update_weight(0.25)
        self.assertEqual(manager.slots.records[0].caps, {"train": 2, "eval": 1})
        await asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(4)))
        self.assertEqual(stub.max_in_flight, 2)
        stub.max_in_flight = 0
        calls = asyncio.gather(*(manager.chat_completion(messages=MESSAGES) for _ in range(8)))
        await asyncio.sleep(0.05)
        self.assertEqual(manager.slots.waiting("train"), 6)
        await manager.update_weight(1.0)
        self.assertEqual(manager.slots.waiting("train"), 0, "waiting calls took the new slots at once")
        await calls
        self.assertEqual(stub.max_in_flight, 8)
        for bad in (-0.5, float("nan"), float("inf"), True, "1"):
            with self.assertRaisesRegex(a.ConfigError, "weight="):
                await manager.update_weight(bad)


class WandbMetrics(Case):
    def test_percentile_is_numpy_linear(self):
        self.assertAlmostEqual(a.percentile([1.0, 2.0, 3.0, 4.0], 99), 3.97)
        self.assertEqual(a.percentile([5.0], 99), 5.0)

    async def test_metric_names_and_values_from_our_counts(self):
        stub = await self.stub()
        manager = self.manager([stub])
        server = manager.servers[0]
        self.assertEqual(await server.wandb_metrics({}, "server_0"), {}, "nothing before the first request")
        for _ in range(3):
            await manager.chat_completion(messages=MESSAGES)
        await manager.completion(prompt="p", split="eval")
        metrics = await server.wandb_metrics({"keep": 1}, "server_0")
        self.assertEqual(sorted(metrics), sorted([
            "keep", "server/server_0_request_time_avg", "server/server_0_request_time_std",
            "server/server_0_request_time_99p", "server/server_0_eval_request_time_avg",
            "server/server_0_eval_request_time_std", "server/server_0_eval_request_time_99p",
            "server/server_0_average_num_attempts", "server/server_0_eval_retry_rate"]))
        self.assertEqual((metrics["server/server_0_average_num_attempts"], metrics["server/server_0_eval_retry_rate"]),
                         (1.0, 1.0))
        times = sorted(server.stats.split_latencies["train"])
        self.assertTrue(times[0] <= metrics["server/server_0_request_time_avg"] <= times[-1])
        self.assertEqual(metrics["server/server_0_eval_request_time_std"], 0.0)
        self.assertIn("server/server_request_time_avg", await server.wandb_metrics({}, None))
        self.assertTrue(server.server_healthy)

    async def test_request_time_std_is_the_population_std_atropos_logs(self):
        stub = await self.stub()
        server = self.manager([stub]).servers[0]
        server.stats.split_latencies["train"].extend([1.0, 2.0, 3.0, 4.0])
        server.stats.split_counts["train"][0] = 4
        metrics = await server.wandb_metrics({}, "s")
        # numpy.std (ddof=0), as Atropos' wandb_metrics: sqrt(1.25), not the sample std sqrt(5/3)
        self.assertAlmostEqual(metrics["server/s_request_time_std"], 1.25 ** 0.5, places=12)
        self.assertAlmostEqual(metrics["server/s_request_time_avg"], 2.5, places=12)
        self.assertAlmostEqual(metrics["server/s_request_time_99p"], 3.97, places=12)

    async def test_failed_attempts_count(self):
        stub = await self.stub(fail_rate=1.0, fail_status=429)
        manager = self.manager([stub], max_retries=1, retry_backoff=0.01)
        with self.assertRaises(a.APIStatusError):
            await manager.chat_completion(messages=MESSAGES)
        stub.fail_rate = 0.0
        await manager.chat_completion(messages=MESSAGES)
        metrics = await manager.servers[0].wandb_metrics({}, "s")
        self.assertEqual(metrics["server/s_average_num_attempts"], 3.0, "2 failed + 1 done, per request done")


class Dedicated(Case):
    async def test_an_episode_stays_on_one_server_and_holds_one_train_slot(self):
        stubs = [await self.stub(), await self.stub()]
        manager = self.manager(stubs, cap=1)
        async with manager.dedicated_server() as server:
            self.assertEqual([s.in_flight["train"] for s in manager.slots.records].count(1), 1)
            for turn in range(4):
                chat = await server.chat_completion(messages=MESSAGES, n=3, max_tokens=4)
                self.assertEqual(len(chat.choices), 3)
            await server.completion(prompt="p", split="eval")
            self.assertEqual(server.config.model_name, "m")
            self.assertTrue(server.server_healthy)
        self.assertEqual(sorted(len(s.requests) for s in stubs), [0, 5], "every turn went to the held server")
        self.assertEqual([s.in_flight for s in manager.slots.records], [{"train": 0, "eval": 0}] * 2)
        await manager.close()
        with self.assertRaises(a.ManagerClosedError):
            async with manager.dedicated_server():
                pass

    async def test_episodes_beyond_the_caps_wait_for_a_slot(self):
        stubs = [await self.stub(latency=0.1), await self.stub(latency=0.1)]
        manager = self.manager(stubs, cap=1)
        held = []

        async def episode():
            async with manager.dedicated_server() as server:
                held.append(server.server)
                await server.chat_completion(messages=MESSAGES)
                await server.chat_completion(messages=MESSAGES)

        await asyncio.gather(*(episode() for _ in range(4)))
        self.assertEqual(sorted(s.max_in_flight for s in stubs), [1, 1], "the cap of 1 held, without deadlock")
        self.assertEqual(sorted(s.received for s in stubs), [4, 4])

    async def test_an_episode_moves_when_its_server_goes_down(self):
        stubs = [await self.stub(), await self.stub()]
        manager = self.manager(stubs, retry_backoff=0.01, health_probe_interval=60)
        async with manager.dedicated_server() as server:
            first = server.server
            await server.chat_completion(messages=MESSAGES)
            await stubs[manager.servers.index(first)].stop()
            chat = await server.chat_completion(messages=MESSAGES)
            self.assertIsNot(server.server, first)
            self.assertTrue(chat.choices[0].message.content)
        self.assertEqual([s.in_flight["train"] for s in manager.slots.records], [0, 0])

    async def test_a_stream_in_an_episode_holds_the_episodes_slot_until_it_ends(self):
        stubs = [await self.stub(), await self.stub()]
        manager = self.manager(stubs, cap=1, config={"timeout": 1.0})  # the slot wait: 1 s
        async with manager.dedicated_server() as server:
            held = server.server
            stream = await server.chat_completion(messages=MESSAGES, stream=True, max_tokens=4, timeout=60)
            self.assertEqual(sum(s.in_flight["train"] for s in manager.slots.records), 1, "the stream takes no other slot")
            # Until the stream ends, the episode's next call waits for the slot (here past its bound).
            with self.assertRaisesRegex(a.ServerTimeoutError, "episode"):
                await server.chat_completion(messages=MESSAGES)
            waiting = asyncio.ensure_future(server.completion(prompt="p"))
            text = "".join([chunk.choices[0].delta.content async for chunk in stream if chunk.choices])
            self.assertRegex(text, "^stub reply from")
            self.assertTrue((await waiting).choices[0].text, "the waiting call ran once the stream ended")
            # A stream closed early gives the slot back too.
            stream = await server.chat_completion(messages=MESSAGES, stream=True)
            async for chunk in stream:
                break
            await stream.aclose()
            await server.chat_completion(messages=MESSAGES)
            self.assertIs(server.server, held)
        self.assertEqual(sorted(s.received for s in stubs), [0, 4], "every call went to the held server")
        self.assertEqual([s.in_flight for s in manager.slots.records], [{"train": 0, "eval": 0}] * 2)

    async def test_a_stream_open_when_its_episode_ends_keeps_the_servers_slot_until_it_ends(self):
        stub = await self.stub()
        manager = self.manager([stub], cap=1)
        async with manager.dedicated_server() as server:
            stream = await server.chat_completion(messages=MESSAGES, stream=True, timeout=60)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 1, "the stream still runs on the cap's one slot")
        other = asyncio.ensure_future(manager.chat_completion(messages=MESSAGES))
        self.assertEqual(len([chunk async for chunk in stream]), 2)
        self.assertTrue((await other).choices, "the slot went to the waiting call when the stream ended")
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        self.assertEqual(stub.max_in_flight, 1)

    async def test_an_ended_episode_refuses_calls_and_takes_no_slot(self):
        stub = await self.stub()
        manager = self.manager([stub], cap=1)
        async with manager.dedicated_server() as server:
            await server.chat_completion(messages=MESSAGES)
        with self.assertRaisesRegex(a.ConfigError, "episode has ended"):
            await server.chat_completion(messages=MESSAGES)
        self.assertEqual(manager.slots.records[0].in_flight["train"], 0)
        self.assertEqual(stub.received, 1)


# =============================================================================================
# patch_atropos and run-env without atroposlib
# =============================================================================================


@unittest.skipIf(importlib.util.find_spec("atroposlib") is not None, "atroposlib is installed here")
class WithoutAtroposlib(unittest.TestCase):
    def test_patch_says_what_is_missing(self):
        with self.assertRaisesRegex(a.ConfigError, "pip install atroposlib"):
            a.patch_atropos()

    def test_run_env_errors_are_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(tmp, "env.py")
            with open(script, "w") as f:
                f.write("raise SystemExit(7)\n")
            for path, expected in ((os.path.join(tmp, "missing.py"), "is not a file"),
                                   (script, "cannot import atroposlib")):
                result = run_module("run-env", path, "serve")
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertIn(expected, result.stderr)


if __name__ == "__main__":
    unittest.main()
