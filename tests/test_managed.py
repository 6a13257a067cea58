"""managed_server, tokens_and_logprobs_completion and get_logprobs: exact token ids and logprobs.

Two parts:

* Loopback fakes answering in the documented shapes of the servers that cannot run here
  (SGLang's native ``/generate``; Atropos' own ``/generate``, example_trainer/vllm_api_server.py)
  and node bookkeeping (default and tree mode, n split, masks, BOS), with a small character
  tokenizer.  Standard library only; Python 3.9 to 3.13.
* Against the real vLLM of tests/vllm (``bash tests/vllm/setup.sh all``), with the tiny model's
  own tokenizer loaded by ``transformers`` (run under a Python that has it: the Atropos venv of
  tests/atropos/setup.sh): every node's tokens are the prompt's ids followed by exactly the ids
  vLLM generated, and its logprobs are vLLM's, cross-checked by direct requests to vLLM; the
  same through Atropos' own ``BaseEnv`` after ``patch_atropos()``, and through Atropos'
  ``process`` subcommand run by ``run-env`` (the groups it writes); and Atropos' own
  ``ManagedServer`` as the control (same requests on the wire, same nodes).
"""

import asyncio
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.request
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from support import AsyncCase, fake, http_response, require, start_stubs, stub_url  # noqa: E402

from atropos_slurm import (  # noqa: E402
    APIServerConfig,
    APIStatusError,
    ConfigError,
    GenerationAbortedError,
    ManagedServerUnsupportedError,
    ManagerClosedError,
    SequenceNode,
    ServerManager,
    ServerTimeoutError,
    TokenProtocolError,
)

BOS, EOS = 1, 2


class CharTokenizer:
    """A tokenizer with the duck-typed surface environments pass: one id per character (its
    code point + 10), the literal text ``<s>`` is BOS, ``encode`` adds BOS with special tokens,
    and the chat template writes a BOS of its own (so template text encoded with special tokens
    starts with two BOS, as with Llama-style tokenizers)."""

    bos_token_id, eos_token_id = BOS, EOS

    def encode(self, text, add_special_tokens=True):
        ids = [BOS] if add_special_tokens else []
        while text:
            if text.startswith("<s>"):
                ids.append(BOS)
                text = text[3:]
            else:
                ids.append(ord(text[0]) + 10)
                text = text[1:]
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(("" if skip_special_tokens else "<s>") if i == BOS else
                       ("" if skip_special_tokens else "</s>") if i == EOS else chr(i - 10) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        text = "<s>" + "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


TOKENIZER = CharTokenizer()


def output_ids(request_number, choice, count):
    """The fake servers' generated ids: lower-case letters, distinct per request and choice."""
    return [10 + ord("a") + (request_number * 7 + choice * 3 + j) % 26 for j in range(count)]


def output_logprobs(request_number, choice, count):
    return [-round(0.01 * (request_number + 1) + 0.1 * choice + 0.001 * j, 6) for j in range(count)]


class TokenShapes:
    """A ``support.FakeServer`` handler answering ``/generate`` in Atropos' or SGLang's shape, or
    vLLM's ``/v1/completions`` token shape (``token_id:N``), as ``shape`` says.

    ``delay(body)`` (seconds) lets a test answer requests out of order; ``status`` forces an
    HTTP status for a path; ``abort`` ends every generation with finish reason abort, or those
    for which ``abort(request_number, choice)`` is true; ``reason(request_number, choice)`` is
    each choice's finish reason ("length"); ``shuffle`` sends vLLM's choices in reverse order;
    ``prompt_logprobs=False`` answers prompt scoring as Atropos' example server does (without).
    """

    def __init__(self, shape, delay=None):
        self.shape, self.delay = shape, delay or (lambda body: 0)
        self.status, self.abort, self.prompt_logprobs, self.shuffle = {}, False, True, False
        self.reason = lambda number, choice: "length"

    def aborted(self, number, choice):
        return self.abort(number, choice) if callable(self.abort) else self.abort

    def finish(self, number, choice):
        return "abort" if self.aborted(number, choice) else self.reason(number, choice)

    async def __call__(self, fake, request, writer):
        number = len(fake.posts) - 1
        body = request.json()
        await asyncio.sleep(self.delay(body))
        writer.write(http_response(*self.answer(request.path, body, number)))
        return True

    def answer(self, path, body, number):
        if path in self.status:
            return self.status[path], {"detail": "Not Found" if self.status[path] == 404 else "error"}
        if self.shape == "atropos" and path == "/generate":
            return 200, self._atropos(body, number)
        if self.shape == "sglang" and path == "/generate":
            return 200, self._sglang(body, number)
        if self.shape == "vllm" and path == "/v1/completions":
            return 200, self._vllm(body, number)
        return 404, {"detail": "Not Found"}

    def _atropos(self, body, number):
        prompt = body["prompt"]["prompt_token_ids"] if isinstance(body["prompt"], dict) else TOKENIZER.encode(body["prompt"])
        if "prompt_logprobs" in body:
            answer = {"text": [""], "finish_reasons": ["length"]}
            if self.prompt_logprobs:
                answer["prompt_logprobs"] = [None] + [
                    {str(t): -0.5, str(t + 1): -1.5} for t in prompt[1:]]
            return answer
        n, count = body.get("n", 1), body.get("max_tokens", 16)
        return {"text": [""] * n, "prompt": "", "finish_reasons": [self.finish(number, c) for c in range(n)],
                "prompt_token_ids": prompt,
                "logprobs": [[[{str(t): lp}] for t, lp in zip(output_ids(number, c, count), output_logprobs(number, c, count))]
                             for c in range(n)],
                "token_ids": [output_ids(number, c, count) for c in range(n)]}

    def _sglang(self, body, number):
        params = body["sampling_params"]
        prompt = body.get("input_ids") or TOKENIZER.encode(body["text"])
        n, count = params.get("n", 1), params.get("max_new_tokens", 16)
        results = []
        for c in range(n):
            reason = self.finish(number, c)
            meta = {"prompt_tokens": len(prompt), "completion_tokens": count,
                    "finish_reason": {"type": "abort", "message": "x"} if reason == "abort" else
                    {"type": reason, "length": count} if reason == "length" else {"type": reason, "matched": EOS},
                    "output_token_logprobs": [[lp, t, None] for t, lp in
                                              zip(output_ids(number, c, count), output_logprobs(number, c, count))]}
            # As SGLang: from logprob_start_len (by default the last prompt id), the first logprob null.
            start = body.get("logprob_start_len", -1) if body.get("logprob_start_len", -1) >= 0 else len(prompt) - 1
            meta["input_token_logprobs"] = [[None if i == start else -0.25, t, None]
                                            for i, t in enumerate(prompt) if i >= start]
            if body.get("logprob_start_len") == 0:
                if body.get("top_logprobs_num"):
                    meta["input_top_logprobs"] = [None] + [[[-0.25, t, None], [-2.0, t + 1, None]] for t in prompt[1:]]
            results.append({"text": "", "output_ids": output_ids(number, c, count), "meta_info": meta})
        return results if n > 1 else results[0]

    def _vllm(self, body, number):
        n, count = body.get("n", 1), body.get("max_tokens", 16)
        choices = [{"index": c, "text": "", "finish_reason": self.finish(number, c),
                    "logprobs": {"tokens": [f"token_id:{t}" for t in output_ids(number, c, count)],
                                 "token_logprobs": output_logprobs(number, c, count)}} for c in range(n)]
        return {"id": "cmpl-1", "object": "text_completion", "choices": choices[::-1] if self.shuffle else choices}


class LoopbackTestCase(AsyncCase):
    async def fake(self, shape, **kw):
        """A fake server in ``shape``; ``.requests`` lists (path, JSON body) as received."""
        shapes = TokenShapes(shape, **kw)
        server = await fake(self, shapes)
        server.shapes = shapes
        return server

    def requests(self, server):
        return [(r.path, r.json()) for r in server.posts]

    def manager(self, *servers, server_type="vllm", **kw):
        kw.setdefault("retry_backoff", 0.0)
        configs = [APIServerConfig(base_url=s.url, model_name="m", server_type=server_type, timeout=10) for s in servers]
        manager = ServerManager(configs, **kw)
        self.addAsyncCleanup(manager.close)
        return manager


# ---------------------------------------------------------------------------------------------
# Nodes: shape, masks, modes, n split
# ---------------------------------------------------------------------------------------------


class NodeTests(LoopbackTestCase):
    async def test_completion_node_is_prompt_ids_then_generated_ids(self):
        fake = await self.fake("atropos")
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            resp = await managed.completion(prompt="Q: 2+2?", n=2, max_tokens=4, temperature=1.0)
            nodes = managed.get_state()["nodes"]
        prompt_ids = TOKENIZER.encode("Q: 2+2?")
        self.assertEqual(len(nodes), 2)
        for c, (node, choice) in enumerate(zip(nodes, resp.choices)):
            self.assertIsInstance(node, SequenceNode)
            self.assertEqual(node.tokens, prompt_ids + output_ids(0, c, 4))
            self.assertEqual(node.masked_tokens, [-100] * len(prompt_ids) + output_ids(0, c, 4))
            self.assertEqual(node.logprobs, [1.0] * len(prompt_ids) + output_logprobs(0, c, 4))
            self.assertEqual(node.metadata, {"finish_reason": "length"})
            self.assertEqual(node.full_text, "Q: 2+2?" + TOKENIZER.decode(output_ids(0, c, 4)))
            self.assertEqual((choice.index, choice.text, choice.finish_reason, choice.logprobs),
                             (c, TOKENIZER.decode(output_ids(0, c, 4)), "length", None))
        self.assertEqual((resp.object, resp.model, resp.usage), ("text_completion", "m", None))
        self.assertEqual(nodes[0].model_dump()["masked_tokens"][:1], [-100])
        # The wire: Atropos' body for its own server (model dropped, logprobs 0, caller's parameters).
        self.assertEqual(self.requests(fake), [("/generate", {"prompt": {"prompt_token_ids": prompt_ids}, "logprobs": 0,
                                                        "n": 2, "max_tokens": 4, "temperature": 1.0})])

    async def test_chat_prompt_from_chat_template_with_doubled_bos_dropped(self):
        fake = await self.fake("atropos")
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            resp = await managed.chat_completion(messages=messages, max_tokens=3)
            node = managed.get_state()["nodes"][0]
        template = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True)
        self.assertTrue(template.endswith("[assistant]"))
        prompt_ids = TOKENIZER.encode(template)[1:]  # [BOS, BOS, ...] -> one BOS
        self.assertEqual(prompt_ids[:2], [BOS, ord("[") + 10])
        self.assertEqual(self.requests(fake)[0][1]["prompt"]["prompt_token_ids"], prompt_ids)
        self.assertEqual(node.tokens, prompt_ids + output_ids(0, 0, 3))
        self.assertEqual(node.full_text, template + TOKENIZER.decode(output_ids(0, 0, 3)))
        choice = resp.choices[0]
        self.assertEqual((resp.object, choice.index, choice.finish_reason), ("chat.completion", 0, "length"))
        self.assertEqual((choice.message.role, choice.message.content, choice.message.tool_calls),
                         ("assistant", TOKENIZER.decode(output_ids(0, 0, 3)), None))

    async def test_default_mode_replaces_the_node_a_prompt_extends(self):
        fake = await self.fake("atropos")
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.completion(prompt="Hello", max_tokens=2)
            first = managed.get_state()["nodes"][0]
            await managed.completion(prompt=first.full_text + " and?", max_tokens=3)
            nodes = managed.get_state()["nodes"]
        self.assertEqual(len(nodes), 1)
        suffix = TOKENIZER.encode(" and?", add_special_tokens=False)
        sent = first.tokens + suffix  # the first node's ids reused, only the new text encoded
        self.assertEqual(self.requests(fake)[1][1]["prompt"]["prompt_token_ids"], sent)
        node = nodes[0]
        self.assertEqual(node.tokens, sent + output_ids(1, 0, 3))
        # The first completion stays trainable; the new text is prompt.
        self.assertEqual(node.masked_tokens, first.masked_tokens + [-100] * len(suffix) + output_ids(1, 0, 3))
        self.assertEqual(node.logprobs, first.logprobs + [1.0] * len(suffix) + output_logprobs(1, 0, 3))
        self.assertEqual(node.full_text, first.full_text + " and?" + TOKENIZER.decode(output_ids(1, 0, 3)))

    async def test_default_mode_extension_with_n_replaces_once_and_appends_the_rest(self):
        fake = await self.fake("atropos")
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.completion(prompt="A", max_tokens=1)
            await managed.completion(prompt="B", max_tokens=1)
            a = managed.get_state()["nodes"][0]
            await managed.completion(prompt=a.full_text + "!", n=2, max_tokens=1)
            texts = [n.full_text for n in managed.get_state()["nodes"]]
        self.assertEqual(len(texts), 3)
        self.assertTrue(texts[0].startswith(a.full_text + "!"))
        self.assertTrue(texts[1].startswith("B"))
        self.assertTrue(texts[2].startswith(a.full_text + "!"))

    async def test_tree_mode_keeps_every_sequence_and_reuses_a_parents_tokens(self):
        fake = await self.fake("atropos")
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER, track_tree=True) as managed:
            await managed.completion(prompt="Hello", max_tokens=2)
            parent = next(iter(managed.get_state()["sequences"].values()))
            await managed.completion(prompt=parent.full_text, max_tokens=2)
            state = managed.get_state()
        self.assertEqual(set(state), {"sequences", "tree"})
        self.assertEqual(len(state["sequences"]), 2)
        self.assertEqual(state["sequences"], state["tree"])
        child = state["sequences"][parent.full_text + TOKENIZER.decode(output_ids(1, 0, 2))]
        self.assertEqual(self.requests(fake)[1][1]["prompt"]["prompt_token_ids"], parent.tokens)
        self.assertEqual(child.tokens, parent.tokens + output_ids(1, 0, 2))
        self.assertIs(state["sequences"][parent.full_text], parent)

    async def test_n_over_max_n_completions_is_split_and_nodes_follow_choice_order(self):
        # The n=1 part is answered first and an n=3 part last: the merge is in choice order anyway.
        fake = await self.fake("atropos", delay=lambda body: 0.3 if body.get("n") == 3 and body.get("max_tokens") else 0)
        manager = self.manager(fake, max_n_completions=3)
        async with manager.managed_server(tokenizer=TOKENIZER) as managed:
            resp = await managed.completion(prompt="P", n=7, max_tokens=2)
            nodes = managed.get_state()["nodes"]
        self.assertEqual(sorted(body["n"] for _, body in self.requests(fake)), [1, 3, 3])
        self.assertEqual([c.index for c in resp.choices], list(range(7)))
        self.assertEqual(len(nodes), 7)
        by_request = {}
        for number, (_, body) in enumerate(self.requests(fake)):
            by_request.setdefault(body["n"], []).append(number)
        n1 = by_request[1][0]
        self.assertEqual(nodes[6].tokens[-2:], output_ids(n1, 0, 2))  # the n=1 request's output is last
        self.assertEqual([n.full_text[1:] for n in nodes], [c.text for c in resp.choices])

    async def test_reset_on_exit_and_state_is_a_copy(self):
        fake = await self.fake("atropos")
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.completion(prompt="x", max_tokens=1)
            state = managed.get_state()
            managed.reset()
            self.assertEqual(managed.get_state(), {"nodes": []})
            await managed.completion(prompt="y", max_tokens=1)
        self.assertEqual(len(state["nodes"]), 1)
        self.assertEqual(managed.get_state(), {"nodes": []})


# ---------------------------------------------------------------------------------------------
# Protocols per server_type
# ---------------------------------------------------------------------------------------------


class ProtocolTests(LoopbackTestCase):
    async def test_sglang_native_generate(self):
        fake = await self.fake("sglang")
        manager = self.manager(fake, server_type="sglang")
        prompt, outputs, logprobs, reasons = await manager.tokens_and_logprobs_completion(
            input_ids=[1, 50, 51], n=2, max_tokens=3, temperature=0.7)
        self.assertEqual(self.requests(fake), [("/generate", {
            "input_ids": [1, 50, 51], "sampling_params": {"n": 2, "max_new_tokens": 3, "temperature": 0.7},
            "return_logprob": True, "return_text_in_logprobs": False})])
        self.assertEqual(prompt, [1, 50, 51])
        self.assertEqual(outputs, [output_ids(0, 0, 3), output_ids(0, 1, 3)])
        self.assertEqual(logprobs, [output_logprobs(0, 0, 3), output_logprobs(0, 1, 3)])
        self.assertEqual(reasons, [{"type": "length", "length": 3}] * 2)  # as SGLang sends it, as Atropos returns it
        async with manager.managed_server(tokenizer=TOKENIZER) as managed:
            await managed.completion(prompt="ab", max_tokens=2)
            node = managed.get_state()["nodes"][0]
        self.assertEqual(node.metadata, {"finish_reason": "length"})
        self.assertEqual(node.tokens, TOKENIZER.encode("ab") + output_ids(1, 0, 2))

    async def test_sglang_text_prompt_and_prompt_logprobs(self):
        fake = await self.fake("sglang")
        manager = self.manager(fake, server_type="sglang")
        prompt, outputs, _, _ = await manager.tokens_and_logprobs_completion(prompt="hey", max_tokens=1)
        self.assertEqual(prompt, TOKENIZER.encode("hey"))  # the server's tokenization, reported back
        self.assertEqual(self.requests(fake)[0][1]["text"], "hey")
        result = await manager.get_logprobs(input_ids=[1, 40, 41], top_k=2)
        self.assertEqual(self.requests(fake)[1][1]["top_logprobs_num"], 2)
        self.assertEqual(self.requests(fake)[1][1]["logprob_start_len"], 0)
        self.assertEqual(result, {"prompt_tokens": [1, 40, 41],
                                  "prompt_topk_token_ids": [[], [40, 41], [41, 42]],
                                  "prompt_topk_logprobs": [[], [-0.25, -2.0], [-0.25, -2.0]]})

    async def test_vllm_type_uses_openai_completions_after_a_404_on_generate(self):
        fake = await self.fake("vllm")
        manager = self.manager(fake)
        with self.assertLogs("atropos_slurm", "INFO") as logs:
            first = await manager.tokens_and_logprobs_completion(input_ids=[1, 20], n=2, max_tokens=2)
        second = await manager.tokens_and_logprobs_completion(input_ids=[1, 21], max_tokens=1)
        self.assertEqual([path for path, _ in self.requests(fake)], ["/generate", "/v1/completions", "/v1/completions"])
        self.assertIn("has no Atropos /generate (404): using vLLM /v1/completions", logs.output[0])
        self.assertEqual(self.requests(fake)[1][1], {"n": 2, "max_tokens": 2, "model": "m", "prompt": [1, 20],
                                               "return_tokens_as_token_ids": True, "logprobs": 0})
        self.assertEqual(first, ([1, 20], [output_ids(1, 0, 2), output_ids(1, 1, 2)],
                                 [output_logprobs(1, 0, 2), output_logprobs(1, 1, 2)], ["length", "length"]))
        self.assertEqual(second[1], [output_ids(2, 0, 1)])

    async def test_concurrent_first_calls_meet_one_404_per_server(self):
        """The /generate -> /v1/completions fallback is a server capability found out once:
        16 first calls in flight at once over 2 stock-vLLM-shaped servers, one 404 each."""
        fakes = [await self.fake("vllm"), await self.fake("vllm")]
        manager = self.manager(*fakes)
        results = await asyncio.gather(*(manager.tokens_and_logprobs_completion(input_ids=[1, 20 + i], max_tokens=1)
                                         for i in range(16)))
        self.assertEqual(len(results), 16)
        for server in fakes:
            paths = [path for path, _ in self.requests(server)]
            self.assertEqual(paths.count("/generate"), 1, paths)
        self.assertEqual(sum(len(self.requests(f)) for f in fakes), 16 + 2)

    async def test_atropos_get_logprobs_and_its_missing_prompt_logprobs(self):
        fake = await self.fake("atropos")
        manager = self.manager(fake)
        result = await manager.get_logprobs(input_ids=[1, 30, 31], top_logprobs=2)
        self.assertEqual(self.requests(fake)[0][1], {"prompt": {"prompt_token_ids": [1, 30, 31]}, "prompt_logprobs": 2,
                                               "n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 1})
        self.assertEqual(result, {"prompt_tokens": [1, 30, 31], "prompt_topk_token_ids": [[], [30, 31], [31, 32]],
                                  "prompt_topk_logprobs": [[], [-0.5, -1.5], [-0.5, -1.5]]})
        async with manager.managed_server(tokenizer=TOKENIZER) as managed:
            via_messages = await managed.get_logprobs(messages=[{"role": "user", "content": "q"}])
        self.assertEqual(self.requests(fake)[1][1]["prompt"]["prompt_token_ids"], TOKENIZER.encode(
            TOKENIZER.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True))[1:])
        self.assertEqual(len(via_messages["prompt_topk_token_ids"]), len(via_messages["prompt_tokens"]))
        fake.shapes.prompt_logprobs = False  # Atropos' example server sends none: a named error, not a KeyError
        with self.assertRaisesRegex(TokenProtocolError, "no 'prompt_logprobs'"):
            await manager.get_logprobs(input_ids=[1, 30])

    async def test_openai_type_refuses_unless_dummy_is_allowed(self):
        fake = await self.fake("atropos")
        manager = self.manager(fake, server_type="openai")
        os.environ.pop("ATROPOS_ALLOW_DUMMY_MANAGED_SERVER", None)
        for error in (ManagedServerUnsupportedError, NotImplementedError, ConfigError):
            with self.assertRaisesRegex(error, "ATROPOS_ALLOW_DUMMY_MANAGED_SERVER"):
                async with manager.managed_server(tokenizer=TOKENIZER):
                    pass
        with self.assertRaises(ManagedServerUnsupportedError):
            await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=1)
        self.assertEqual(self.requests(fake), [])

    async def test_tools_ignored_without_a_tool_parser_and_refused_with_one(self):
        fake = await self.fake("atropos")
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.chat_completion(messages=[{"role": "user", "content": "x"}], tools=tools, max_tokens=1)
        self.assertNotIn("tools", self.requests(fake)[0][1])
        async with self.manager(fake, tool_parser="hermes").managed_server(tokenizer=TOKENIZER) as managed:
            with self.assertRaisesRegex(ManagedServerUnsupportedError, "tool_parser='hermes'"):
                await managed.chat_completion(messages=[{"role": "user", "content": "x"}], tools=tools, max_tokens=1)
        self.assertEqual(len(fake.posts), 1)

    async def test_timeout_and_split_are_options_of_the_call(self):
        fake = await self.fake("atropos", delay=lambda body: 2.0 if body.get("max_tokens") == 9 else 0)
        manager = self.manager(fake, max_retries=0)
        await manager.tokens_and_logprobs_completion(input_ids=[1, 20], max_tokens=1, split="eval", timeout=5)
        self.assertEqual(self.requests(fake)[0][1], {"prompt": {"prompt_token_ids": [1, 20]}, "logprobs": 0,
                                                     "max_tokens": 1})
        self.assertEqual(manager.servers[0].stats.split_counts["eval"][0], 1)
        with self.assertRaises(ServerTimeoutError):
            await manager.tokens_and_logprobs_completion(input_ids=[1, 20], max_tokens=9, timeout=0.2)

    async def test_trl_type_refuses(self):
        fake = await self.fake("atropos")
        with self.assertRaisesRegex(ManagedServerUnsupportedError, "server_type='trl'"):
            async with self.manager(fake, server_type="trl").managed_server(tokenizer=TOKENIZER):
                pass

    async def test_errors_are_named(self):
        fake = await self.fake("atropos")
        manager = self.manager(fake, max_retries=1)
        with self.assertRaisesRegex(ConfigError, "tokenizer="):
            async with manager.managed_server():
                pass
        with self.assertRaisesRegex(ConfigError, "input_ids"):
            await manager.tokens_and_logprobs_completion(input_ids=["a"])
        closed = self.manager(fake)
        await closed.close()
        for call in (closed.tokens_and_logprobs_completion, closed.get_logprobs):
            with self.assertRaises(ManagerClosedError):
                await call(input_ids=[1], max_tokens=1)
        with self.assertRaisesRegex(ConfigError, "top_k"):
            await manager.get_logprobs(input_ids=[1], top_k="3")
        with self.assertRaisesRegex(ConfigError, "give input_ids"):
            await manager.tokens_and_logprobs_completion(max_tokens=1)
        with self.assertRaisesRegex(ConfigError, "base_url"):
            async with manager.managed_server(tokenizer=TOKENIZER, base_url=fake.url):
                pass
        fake.shapes.status["/generate"] = 400  # a 4xx other than 404: raised at once
        with self.assertRaises(APIStatusError):
            await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=1)
        self.assertEqual(len(self.requests(fake)), 1)
        del fake.shapes.status["/generate"]
        fake.shapes.abort = True  # aborted generations are retried, then raised
        with self.assertRaises(GenerationAbortedError):
            await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=1)
        self.assertEqual(len(self.requests(fake)), 3)


class Canned:
    """A ``support.FakeServer`` handler answering POSTs to ``path`` with ``body`` (bytes as they
    are, other values as JSON), 404 elsewhere: stock vLLM when ``path`` is ``/v1/completions``."""

    def __init__(self, path, body):
        self.path, self.body = path, body

    async def __call__(self, fake, request, writer):
        if request.path != self.path:
            writer.write(http_response(404, {"detail": "Not Found"}))
        else:
            body = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
            writer.write(http_response(200, body, [("Content-Type", "application/json")]))
        return True


def vllm_choice(index, tokens, logprobs, reason="length", **extra):
    return dict({"index": index, "text": "", "finish_reason": reason,
                 "logprobs": {"tokens": tokens, "token_logprobs": logprobs}}, **extra)


def vllm_answer(*choices):
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": list(choices)}


def sglang_result(entries, reason=None, **meta):
    return {"text": "", "meta_info": dict({"finish_reason": reason or {"type": "length", "length": len(entries)},
                                           "output_token_logprobs": entries}, **meta)}


OK_VLLM = vllm_choice(0, ["token_id:5", "token_id:6"], [-0.5, -0.25])


class StrictAnswerTests(LoopbackTestCase):
    """The malformed answers of issue 16's review, over HTTP: each a TokenProtocolError naming
    the server and the field, raised at once (a malformed answer is not retried), nothing
    recorded; before, each became training data or a raw TypeError/AttributeError."""

    # (server_type, path answered, call, answer, what the message names)
    COMPLETION = dict(input_ids=[1, 20, 21], max_tokens=2)
    CASES = [
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, ["token_id:5", "token_id:6", "token_id:7"], [-0.5])),
         r"choices\[0\]\.logprobs\.token_logprobs must be a list of 3 item\(s\), got 1 item\(s\)"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, ["token_id:5"], [-0.5, -0.1, -0.2])),
         r"token_logprobs must be a list of 1 item"),
        ("vllm", "/v1/completions", dict(COMPLETION, n=3), vllm_answer(OK_VLLM), r"choices must be a list of 3 item\(s\), got 1"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(OK_VLLM, dict(OK_VLLM, index=1), dict(OK_VLLM, index=2)),
         r"choices must be a list of 1 item\(s\), got 3"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(), r"choices must be a list of 1 item\(s\), got 0"),
        ("vllm", "/v1/completions", dict(COMPLETION, n=2), vllm_answer(OK_VLLM, OK_VLLM), r"choices\[1\]\.index must be an index 0\.\.1"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(dict(OK_VLLM, finish_reason=None)), r"has no 'choices\[0\]\.finish_reason'"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(dict(OK_VLLM, finish_reason=7)), r"finish_reason must be a finish reason"),
        ("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, ["token_id:5", "token_id:6"], "ab")),
         r"token_logprobs must be a list of 2"),
        ("sglang", "/generate", COMPLETION, sglang_result([[-0.5, 100.7, None]]), r"output_token_logprobs\[0\]\[1\] must be a token id"),
        ("sglang", "/generate", COMPLETION, sglang_result([[-0.5, True, None]]), r"must be a token id.*got True"),
        ("sglang", "/generate", COMPLETION, sglang_result([[100, -0.5, None]]), r"output_token_logprobs\[0\]\[1\] must be a token id"),
        ("sglang", "/generate", COMPLETION, {"text": "", "meta_info": [1, 2]}, r"meta_info must be a JSON object"),
        ("sglang", "/generate", COMPLETION, sglang_result([[-0.5, 5, None]], reason=None) | {"meta_info": {
            "output_token_logprobs": [[-0.5, 5, None]]}}, r"has no 'meta_info\.finish_reason'"),
        ("sglang", "/generate", dict(COMPLETION, n=2), [sglang_result([[-0.5, 5, None]])], r"results must be a list of 2"),
        # result 1 reports another prompt (only result 0's was read): its tokens continue a prompt not sent
        ("sglang", "/generate", dict(COMPLETION, n=2), [sglang_result([[-0.5, 5, None]]), sglang_result(
            [[-0.5, 5, None]], input_token_logprobs=[[None, 1, None], [-1.0, 20, None], [-1.0, 22, None]])],
         r"\[1\]\.meta_info\.input_token_logprobs must be the last of the 3 prompt ids sent"),
        ("sglang", "/generate", dict(prompt="abc", n=2, max_tokens=1), [sglang_result(
            [[-0.5, 5, None]], input_token_logprobs=[[None, 97, None], [-1.0, 98, None], [-1.0, 99, None]]), sglang_result(
            [[-0.5, 5, None]], input_token_logprobs=[[None, 97, None], [-1.0, 98, None]])],
         r"\[1\]\.meta_info\.input_token_logprobs must be the ids of result 0's prompt, got \[97, 98\]"),
        ("sglang", "/generate", dict(input_ids=[1, 20, 21], top_k=1, logprobs=True), sglang_result(
            [[-0.5, 5, None]], input_token_logprobs=[[None, 1, None], [-1.0, 20, None], [-1.0, 21, None]]),
         r"has no 'meta_info\.input_top_logprobs'"),
        ("vllm", "/generate", COMPLETION, {"text": [""], "finish_reasons": 5, "logprobs": [[[{"5": -0.5}]]]},
         r"finish_reasons must be a list of 1, got 5"),
        ("vllm", "/generate", COMPLETION, {"text": [""], "finish_reasons": "length", "logprobs": [[[{"5": -0.5}]]]},
         r"finish_reasons must be a list of 1, got 'length'"),
        ("vllm", "/generate", dict(prompt="abc", max_tokens=1), {"text": [""], "finish_reasons": ["length"],
                                                                "logprobs": [[[{"5": -0.5}]]], "prompt_token_ids": "abc"},
         r"prompt_token_ids must be a list, got 'abc'"),
        ("vllm", "/generate", COMPLETION, {"text": [""], "finish_reasons": ["length"], "logprobs": [[[{"5": -0.5}]]],
                                           "prompt_token_ids": [1, 20, 22]}, r"prompt_token_ids must be the 3 prompt ids sent"),
        ("vllm", "/generate", COMPLETION, {"text": [""], "finish_reasons": ["length"], "logprobs": [[[{"5": -0.5}]]],
                                           "token_ids": [[6]]}, r"token_ids\[0\] must be the sampled ids of logprobs\[0\]"),
        ("vllm", "/generate", dict(input_ids=[1, 20, 21], top_k=1), {"prompt_logprobs": [None, {"20": -0.5}]},
         r"prompt_logprobs must be a list of 3 item\(s\), got 2"),
        ("vllm", "/generate", dict(input_ids=[1, 20, 21], top_k=1),
         {"prompt_logprobs": [None, {"20": -0.5}, {"21": -0.5}, {"3": -1.0}, {"4": -1.0}]}, r"a list of 3 item\(s\), got 5"),
        ("vllm", "/generate", dict(input_ids=[1, 20, 21], top_k=2), {"prompt_logprobs": [None, {"20": -0.5}, {"21": -0.5, "4": -1.0}]},
         r"prompt_logprobs\[1\] must be at least the 2 logprob\(s\) asked"),
        ("vllm", "/generate", dict(input_ids=[1, 20, 21], top_k=1), {"prompt_logprobs": [None, {"21": -0.5}, {"20": -0.5}]},
         r"prompt_logprobs\[1\] must be the logprobs of a position that holds the prompt's token 20"),
        ("vllm", "/v1/completions", dict(input_ids=[1, 20, 21], top_k=1), vllm_answer(dict(OK_VLLM, prompt_logprobs=[
            None, {"20": {"logprob": -0.5}}, {"21": {"logprob": 0.5}}])), r"prompt_logprobs\[2\]\['21'\] must be a logprob"),
    ]
    # Logprob values and token spellings no reader may take (vLLM's /v1/completions answer).
    for value in (None, "x", True, 3.5, "-0.5", [-0.5]):
        CASES.append(("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, ["token_id:5"], [value])),
                      r"token_logprobs\[0\] must be a logprob: a finite number <= 0, got " + re.escape(repr(value))))
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        CASES.append(("vllm", "/v1/completions", COMPLETION, json.dumps(vllm_answer(vllm_choice(0, ["token_id:5"], [0.0]))).encode()
                      .replace(b"[0.0]", b"[" + literal + b"]"), "holds " + literal.decode() + ", which is not JSON"))
    for token in ("token_id:-100", "token_id:-5", "token_id: 7 ", "token_id:+7", "token_id:1_000", "token_id:٣",
                  "token_id:7.0", "token_id:2147483648"):
        CASES.append(("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, [token], [-0.5])),
                      r"logprobs\.tokens\[0\] must be 'token_id:' and a token id: an integer >= 0 and < 2\*\*31, got"))
    for token in ("7", 7, "Hello"):  # text tokens: return_tokens_as_token_ids was not honoured
        CASES.append(("vllm", "/v1/completions", COMPLETION, vllm_answer(vllm_choice(0, [token], [-0.5])),
                      r"tokens\[0\] must be 'token_id:' .* \(did the server ignore return_tokens_as_token_ids\?\)"))

    async def test_malformed_answers_are_named_errors_and_not_retried(self):
        for server_type, path, call, body, message in self.CASES:
            with self.subTest(server_type=server_type, path=path, body=str(body)[:120]):
                server = await fake(self, Canned(path, body))
                manager = self.manager(server, server_type=server_type, max_retries=2)
                method = manager.get_logprobs if "top_k" in call else manager.tokens_and_logprobs_completion
                with self.assertRaisesRegex(TokenProtocolError, message) as caught:
                    await method(**{k: v for k, v in call.items() if k != "logprobs"})
                text = str(caught.exception)
                self.assertTrue(text.startswith(server.url + ": "), text)
                self.assertNotIn("\n", text)
                self.assertLess(len(text), 400, text)
                self.assertEqual([r.path for r in server.posts if r.path == path], [path], "not retried")
                self.assertTrue(manager.slots.records[0].healthy, "a malformed answer does not mark the server down")

    async def test_nothing_is_recorded_from_a_malformed_answer(self):
        server = await fake(self, Canned("/v1/completions", vllm_answer(vllm_choice(0, ["token_id:5", "token_id:6"], [-0.5]))))
        async with self.manager(server).managed_server(tokenizer=TOKENIZER) as managed:
            with self.assertRaises(TokenProtocolError):
                await managed.completion(prompt="ab", max_tokens=2)
            self.assertEqual(managed.get_state(), {"nodes": []})

    async def test_ids_below_the_tokenizers_size_when_it_tells(self):
        class SizedTokenizer(CharTokenizer):
            def __len__(self):
                return 100

        body = vllm_answer(vllm_choice(0, ["token_id:99", "token_id:100"], [-0.5, -0.5]))
        server = await fake(self, Canned("/v1/completions", body))
        manager = self.manager(server)
        async with manager.managed_server(tokenizer=SizedTokenizer()) as managed:
            with self.assertRaisesRegex(TokenProtocolError, r"tokens\[1\].*< 100 \(len\(tokenizer\)\), got 'token_id:100'"):
                await managed.completion(prompt="a", max_tokens=2)
        _, outputs, _, _ = await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=2)
        self.assertEqual(outputs, [[99, 100]], "without a tokenizer, ids are bounded by 2**31 only")

    async def test_valid_answers_in_every_form_are_read(self):
        # vLLM's -9999.0 for minus infinity is a number; older SGLang's string finish reasons; logprob 0.
        server = await fake(self, Canned("/v1/completions", vllm_answer(vllm_choice(0, ["token_id:5", "token_id:0"], [-9999.0, 0]))))
        result = await self.manager(server).tokens_and_logprobs_completion(input_ids=[1], max_tokens=2)
        self.assertEqual(result, ([1], [[5, 0]], [[-9999.0, 0.0]], ["length"]))
        server = await fake(self, Canned("/generate", [sglang_result([[-0.5, 110, None]], reason="stop"),
                                                       sglang_result([[-0.25, 111, None]], reason={"type": "length", "length": 1})]))
        manager = self.manager(server, server_type="sglang")
        result = await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=1, n=2)
        self.assertEqual(result, ([1], [[110], [111]], [[-0.5], [-0.25]], ["stop", {"type": "length", "length": 1}]))
        async with manager.managed_server(tokenizer=TOKENIZER) as managed:
            resp = await managed.completion(prompt="a", max_tokens=1, n=2)
        self.assertEqual([c.finish_reason for c in resp.choices], ["stop", "length"])

    async def test_an_abort_in_either_form_is_retried(self):
        for body in ([sglang_result([[-0.5, 5, None]]), sglang_result([[-0.5, 5, None]], reason="abort")],
                     [sglang_result([[-0.5, 5, None]]), sglang_result([], reason={"type": "abort", "message": "paused"})]):
            with self.subTest(body=body):
                server = await fake(self, Canned("/generate", body))
                manager = self.manager(server, server_type="sglang", max_retries=1)
                with self.assertRaisesRegex(GenerationAbortedError, r"\[1\]\.meta_info\.finish_reason is 'abort'"):
                    await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=1, n=2)
                self.assertEqual(len(server.posts), 2, "retried like a 5xx")

    async def test_n_of_a_token_call_is_a_positive_integer(self):
        server = await fake(self, Canned("/generate", {}))
        for n in (0, -1, "2", True, 1.5):
            with self.assertRaisesRegex(ConfigError, "n="):
                await self.manager(server).tokens_and_logprobs_completion(input_ids=[1], n=n)
        self.assertEqual(server.posts, [])

    async def test_sglang_reports_the_prompt_from_its_default_logprob_start_len(self):
        # A token-id prompt is sent without logprob_start_len, and SGLang then reports
        # input_token_logprobs from its default: the last prompt id (scheduler: len(ids) - 1), or
        # none (newer releases).  That report was compared with the whole prompt: every SGLang
        # token call with input_ids raised TokenProtocolError.
        output = [[-0.5, 5, None], [-0.25, 6, None]]
        for reported in ([[None, 21, None]], [], [[None, 20, None], [-1.0, 21, None]]):
            with self.subTest(reported=reported):
                server = await fake(self, Canned("/generate", sglang_result(output, input_token_logprobs=reported)))
                prompt, outputs, logprobs, _ = await self.manager(server, server_type="sglang") \
                    .tokens_and_logprobs_completion(input_ids=[1, 20, 21], max_tokens=2)
                self.assertEqual((prompt, outputs, logprobs), ([1, 20, 21], [[5, 6]], [[-0.5, -0.25]]))
        for reported in ([[None, 20, None]], [[None, 7, None], [-1.0, 1, None], [-1.0, 20, None], [-1.0, 21, None]]):
            with self.subTest(reported=reported):
                server = await fake(self, Canned("/generate", sglang_result(output, input_token_logprobs=reported)))
                with self.assertRaisesRegex(TokenProtocolError, r"meta_info\.input_token_logprobs must be the last of "
                                                                r"the 3 prompt ids sent"):
                    await self.manager(server, server_type="sglang").tokens_and_logprobs_completion(
                        input_ids=[1, 20, 21], max_tokens=2)

    async def test_vocab_is_a_positive_integer_checked_before_anything_is_sent(self):
        # vocab="32000" raised a bare TypeError (int < str) from the reader after the generation
        # was paid for; 0 silently checked nothing; -5 refused every id the server sent.
        server = await fake(self, Canned("/generate", {}))
        manager = self.manager(server)
        for vocab in ("lots", 0, -5, True, 2.5):
            for call in (manager.tokens_and_logprobs_completion, manager.get_logprobs):
                with self.subTest(vocab=vocab, call=call.__name__):
                    with self.assertRaisesRegex(ConfigError, "^vocab="):
                        await call(input_ids=[1], max_tokens=1, vocab=vocab)
        self.assertEqual(server.posts, [])


class WhatUniformFakesMissTests(LoopbackTestCase):
    """Issue 16, item 5: assertions the uniform fakes (choices in order, one finish reason for
    all, aborts on every result or none) could not make."""

    async def test_prompt_after_an_assistant_message_has_no_generation_prompt(self):
        fake = await self.fake("atropos")
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.chat_completion(messages=messages, max_tokens=2)
            node = managed.get_state()["nodes"][0]
        template = TOKENIZER.apply_chat_template(messages, add_generation_prompt=False)
        self.assertFalse(template.endswith("[assistant]"))
        sent = self.requests(fake)[0][1]["prompt"]["prompt_token_ids"]
        self.assertEqual(sent, TOKENIZER.encode(template)[1:])
        self.assertEqual(node.full_text, template + TOKENIZER.decode(output_ids(0, 0, 2)))

    async def test_each_choice_keeps_its_own_finish_reason_in_order_also_across_a_split(self):
        for shape, server_type in (("atropos", "vllm"), ("sglang", "sglang"), ("vllm", "vllm")):
            with self.subTest(shape=shape):
                fake = await self.fake(shape)
                fake.shapes.reason = lambda number, choice: ("stop", "length")[(number + choice) % 2]
                manager = self.manager(fake, server_type=server_type)
                async with manager.managed_server(tokenizer=TOKENIZER) as managed:
                    resp = await managed.completion(prompt="P", n=2, max_tokens=1)
                    nodes = managed.get_state()["nodes"]
                first = len(fake.posts) - 1
                want = [("stop", "length")[(first + c) % 2] for c in range(2)]
                self.assertEqual([c.finish_reason for c in resp.choices], want)
                self.assertEqual([n.metadata["finish_reason"] for n in nodes], want)
        fake = await self.fake("atropos")
        fake.shapes.reason = lambda number, choice: f"reason-{number}-{choice}"
        manager = self.manager(fake, max_n_completions=3)
        async with manager.managed_server(tokenizer=TOKENIZER) as managed:
            resp = await managed.completion(prompt="P", n=7, max_tokens=1)
            nodes = managed.get_state()["nodes"]
        # Parts of n 3, 3, 1 in that order; which request (number) served each n=3 part is the
        # server's arrival order, so the result tells: each part's choices together, in order.
        got = [c.finish_reason for c in resp.choices]
        numbers = [int(got[0].split("-")[1]), int(got[3].split("-")[1]), int(got[6].split("-")[1])]
        self.assertEqual(sorted(numbers), [0, 1, 2])
        self.assertEqual([fake.posts[number].json()["n"] for number in numbers], [3, 3, 1])
        want = [f"reason-{number}-{c}" for number in numbers for c in range(fake.posts[number].json()["n"])]
        self.assertEqual(got, want)
        self.assertEqual([n.metadata["finish_reason"] for n in nodes], want)
        self.assertEqual([n.tokens[-1] for n in nodes],
                         [output_ids(number, c, 1)[0] for number in numbers for c in range(fake.posts[number].json()["n"])])

    async def test_split_text_prompt_tokenized_differently_by_the_servers_is_an_error(self):
        """A text prompt's split parts are tokenized by the servers that answer them: a
        version-skewed server (another tokenizer or template: here no first id) gives outputs
        that continue other prompt ids, which must never be merged into one group."""
        same, skewed = await self.fake("atropos"), await self.fake("atropos")
        answer = skewed.shapes._atropos
        skewed.shapes._atropos = lambda body, number: dict(answer(body, number),
                                                          prompt_token_ids=answer(body, number)["prompt_token_ids"][1:])
        agreeing = self.manager(same, same, max_n_completions=2, routing="round_robin")
        prompt, outputs, _, _ = await agreeing.tokens_and_logprobs_completion(prompt="Hello", n=4, max_tokens=2)
        self.assertEqual((prompt, len(outputs)), (TOKENIZER.encode("Hello"), 4))
        manager = self.manager(same, skewed, max_n_completions=2, routing="round_robin")
        with self.assertRaisesRegex(TokenProtocolError, "tokenized differently: part 0 as 6 ids, part 1 as"):
            await manager.tokens_and_logprobs_completion(prompt="Hello", n=4, max_tokens=2)
        self.assertTrue(all(row["healthy"] for row in manager.stats()))

    async def test_vllm_choices_out_of_index_order_come_back_in_index_order(self):
        fake = await self.fake("vllm")
        fake.shapes.shuffle = True
        fake.shapes.reason = lambda number, choice: ("stop", "length", "stop")[choice]
        manager = self.manager(fake)
        prompt, outputs, logprobs, reasons = await manager.tokens_and_logprobs_completion(
            input_ids=[1, 20], n=3, max_tokens=2)
        self.assertEqual([c["index"] for c in fake.shapes._vllm({"n": 3}, 1)["choices"]], [2, 1, 0])
        self.assertEqual(outputs, [output_ids(1, c, 2) for c in range(3)])
        self.assertEqual(logprobs, [output_logprobs(1, c, 2) for c in range(3)])
        self.assertEqual(reasons, ["stop", "length", "stop"])

    async def test_sglang_answer_whose_second_result_aborted_is_retried(self):
        fake = await self.fake("sglang")
        fake.shapes.abort = lambda number, choice: number == 0 and choice == 1
        manager = self.manager(fake, server_type="sglang")
        prompt, outputs, _, reasons = await manager.tokens_and_logprobs_completion(input_ids=[1, 20], n=2, max_tokens=2)
        self.assertEqual(len(fake.posts), 2, "the aborted answer was retried")
        self.assertEqual(outputs, [output_ids(1, c, 2) for c in range(2)], "the retry's answer, whole")
        self.assertEqual([r["type"] for r in reasons], ["length", "length"])

    async def test_input_ids_with_a_negative_id_is_a_config_error_before_anything_is_sent(self):
        fake = await self.fake("atropos")
        manager = self.manager(fake)
        for ids in ([1, -5, 3], [-100], [1, True], "abc", [1.0]):
            with self.assertRaisesRegex(ConfigError, "input_ids"):
                await manager.tokens_and_logprobs_completion(input_ids=ids, max_tokens=1)
            with self.assertRaisesRegex(ConfigError, "input_ids"):
                await manager.get_logprobs(input_ids=ids)
        self.assertEqual(fake.posts, [])

    async def test_concurrent_calls_on_one_session_replace_the_node_each_extends(self):
        # Two nodes equal by value (the same prompt and completion twice), then two calls at once
        # that both extend the first: the first to finish replaces it, the second is appended,
        # and the second equal node stays, the very same object.
        async def same_answer_slow_for_three(fake_server, request, writer):
            count = request.json()["max_tokens"]
            await asyncio.sleep(0.3 if count == 3 else 0)
            writer.write(http_response(200, {"text": [""], "finish_reasons": ["stop"], "logprobs": [
                [[{str(TOKENIZER.encode("x", False)[0] + j): -0.5}] for j in range(count)]]}))
            return True

        fake = await globals()["fake"](self, same_answer_slow_for_three)
        async with self.manager(fake).managed_server(tokenizer=TOKENIZER) as managed:
            await managed.completion(prompt="A", max_tokens=1)
            await managed.completion(prompt="A", max_tokens=1)
            first, second = managed.get_state()["nodes"]
            self.assertEqual(first, second)
            self.assertIsNot(first, second)
            await asyncio.gather(managed.completion(prompt=first.full_text + "!", max_tokens=3),
                                 managed.completion(prompt=first.full_text + "?", max_tokens=2))
            nodes = managed.get_state()["nodes"]
        self.assertEqual(len(nodes), 3)
        self.assertTrue(nodes[0].full_text.startswith(first.full_text + "?"), "the first to finish replaced it")
        self.assertIs(nodes[1], second, "the node equal to the extended one was not replaced")
        self.assertTrue(nodes[2].full_text.startswith(first.full_text + "!"))


class StubServerTokenTests(LoopbackTestCase):
    """The module's stub server speaks the token protocols, deterministically (``StubTokens``):
    managed_server, tokens_and_logprobs_completion and get_logprobs end to end over HTTP,
    through the readers, for each server_type and protocol."""

    async def stub(self, **options):
        from atropos_slurm import StubServer
        stub = await StubServer(**options).start()
        self.addAsyncCleanup(stub.stop)
        stub.url = stub_url(stub)
        return stub

    async def test_every_protocol_gives_the_stubs_ids_and_logprobs(self):
        from atropos_slurm import StubTokens
        prompt_ids = TOKENIZER.encode("Q: 2+2?")
        for server_type, options, path in (("vllm", {}, "/generate"), ("vllm", {"generate": False}, "/v1/completions"),
                                           ("sglang", {}, "/generate")):
            with self.subTest(server_type=server_type, path=path):
                stub = await self.stub(**options)
                manager = self.manager(stub, server_type=server_type, max_n_completions=2)
                async with manager.managed_server(tokenizer=TOKENIZER) as managed:
                    resp = await managed.completion(prompt="Q: 2+2?", n=3, max_tokens=4)
                    nodes = managed.get_state()["nodes"]
                want = StubTokens.outputs(prompt_ids, 2, 4) + StubTokens.outputs(prompt_ids, 1, 4)  # split 2 + 1
                self.assertEqual([n.tokens for n in nodes], [prompt_ids + [t for t, _ in w] for w in want])
                self.assertEqual([n.logprobs[len(prompt_ids):] for n in nodes], [[lp for _, lp in w] for w in want])
                self.assertEqual([c.finish_reason for c in resp.choices], ["length"] * 3)
                scored = await manager.get_logprobs(input_ids=prompt_ids, top_k=2)
                self.assertEqual(scored["prompt_topk_token_ids"][0], [])
                self.assertEqual([ids[0] for ids in scored["prompt_topk_token_ids"][1:]], prompt_ids[1:])
                self.assertTrue(all(len(ids) == 2 for ids in scored["prompt_topk_token_ids"][1:]))
                text = await manager.tokens_and_logprobs_completion(prompt="hé", max_tokens=2)
                self.assertEqual(text[0], list("hé".encode()))
                self.assertEqual(stub.completed, 4)

    async def test_malformed_token_requests_are_named_400s(self):
        from atropos_slurm import StubTokens
        for path, body in (("/generate", b"[1]"), ("/generate", b'{"prompt": {"prompt_token_ids": [-1]}}'),
                           ("/generate", b'{"input_ids": [1], "sampling_params": {"n": 0}}'),
                           ("/v1/completions", b'{"prompt": [1], "max_tokens": "3"}')):
            status, payload = StubTokens.answer(path, body)
            self.assertEqual(status, 400, body)
            self.assertIn("invalid request", payload["error"]["message"])
        stub = await self.stub(generate=False)
        manager = self.manager(stub)
        with self.assertRaisesRegex(APIStatusError, "max_tokens must be positive"):
            await manager.tokens_and_logprobs_completion(input_ids=[1], max_tokens=0)


class DummyManagedServerTests(LoopbackTestCase):
    async def test_placeholder_nodes_with_the_environment_variable(self):
        stub, = await start_stubs(self, 1)
        config = APIServerConfig(base_url=stub_url(stub), model_name="m", server_type="openai")
        manager = ServerManager([config])
        self.addAsyncCleanup(manager.close)
        os.environ["ATROPOS_ALLOW_DUMMY_MANAGED_SERVER"] = "1"
        self.addCleanup(os.environ.pop, "ATROPOS_ALLOW_DUMMY_MANAGED_SERVER", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with manager.managed_server(tokenizer=TOKENIZER) as managed:
                resp = await managed.chat_completion(messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3)
                nodes = managed.get_state()["nodes"]
        self.assertIn("NOT fit for training", str(caught[0].message))
        self.assertEqual(len(nodes), 2)
        self.assertEqual(nodes[0].tokens, list(range(128)))
        self.assertEqual(nodes[0].masked_tokens[:2], [-100, 1])
        self.assertEqual(nodes[0].metadata["dummy_tokens"], True)
        self.assertEqual(nodes[0].full_text, f"user:hi\n\nassistant:{resp.choices[0].message.content}")


# ---------------------------------------------------------------------------------------------
# Against the real vLLM of tests/vllm
# ---------------------------------------------------------------------------------------------


def require_atroposlib(module):
    """``module`` of atroposlib importable here (the Atropos venv), else skip, or fail in CI."""
    require("atroposlib", importlib.util.find_spec(module.split(".")[0]) is not None,
            "bash tests/atropos/setup.sh, then run this file with "
            "/opt/atropos-env-venv/bin/python -m pytest tests/test_managed.py")
    importlib.import_module(module)


def post_root(base_url, path, body):
    """POST JSON to the root of ``base_url``'s server, directly (never via $http_proxy)."""
    root = base_url.rsplit("/v1", 1)[0]
    request = urllib.request.Request(root + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        return json.loads(response.read())


def tiny_tokenizer_dir(model_dir):
    """A directory transformers can load the tiny model's tokenizer from.

    tests/vllm builds it with the vLLM venv's transformers 5.x, whose tokenizer_config.json
    names the class ``TokenizersBackend``; Atropos' environments run on 4.x, which knows it as
    ``PreTrainedTokenizerFast``.  For 4.x: a copy whose config says so (same tokenizer.json,
    same ids, same chat template).
    """
    import transformers
    if not transformers.__version__.startswith("4."):
        return model_dir
    target = tempfile.mkdtemp(prefix="tiny-tokenizer-")
    shutil.copy(os.path.join(model_dir, "tokenizer.json"), target)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", [])
    config.pop("backend", None)
    with open(os.path.join(target, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return target


def load_tiny_tokenizer(model_dir):
    """(tokenizer, the directory it was loaded from), or skip when transformers is missing."""
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer
    except ImportError:
        require("transformers", False, "run this file under a Python with transformers, e.g. "
                                       "/opt/atropos-env-venv/bin/python -m pytest tests/test_managed.py")
    directory = tiny_tokenizer_dir(model_dir)
    return AutoTokenizer.from_pretrained(directory), directory


class VLLMCheck(unittest.IsolatedAsyncioTestCase):
    """Servers A and B of tests/vllm, the tiny model's tokenizer, and the cross-checks against vLLM."""

    compared = {"nodes": 0, "tokens": 0, "logprobs": 0, "max_abs_diff": 0.0}  # over the file, printed at the end

    @classmethod
    def setUpClass(cls):
        from test_vllm_interop import vllm_settings
        cls.vllm = vllm_settings()
        cls.tokenizer, cls.tokenizer_dir = load_tiny_tokenizer(cls.vllm["ATROPOS_VLLM_MODEL_DIR"])
        cls.urls = [cls.vllm["ATROPOS_VLLM_URL_A"], cls.vllm["ATROPOS_VLLM_URL_B"]]

    @classmethod
    def tearDownClass(cls):
        if cls.tokenizer_dir != cls.vllm["ATROPOS_VLLM_MODEL_DIR"]:
            shutil.rmtree(cls.tokenizer_dir, ignore_errors=True)
        sys.stderr.write(f"\n[test_managed] compared against vLLM so far: {VLLMCheck.compared}\n")

    async def asyncSetUp(self):
        config = APIServerConfig(base_url=self.urls[0], api_key=self.vllm["ATROPOS_VLLM_API_KEY"], timeout=60,
                                 model_name=self.vllm["ATROPOS_VLLM_MODEL"])
        self.direct = ServerManager([config])  # plain OpenAI requests for the cross-checks

    async def asyncTearDown(self):
        await self.direct.close()

    async def score(self, tokens):
        """vLLM's own logprob of every token of ``tokens`` given the ones before (prompt_logprobs)."""
        resp = await self.direct.completion(prompt=tokens, max_tokens=1, prompt_logprobs=0, temperature=0)
        positions = resp.choices[0].prompt_logprobs
        return [None] + [position[str(t)]["logprob"] for position, t in zip(positions[1:], tokens[1:])]

    def assert_same_logprob(self, got, want):
        """Equal up to float32 noise (a batched decode step and a prefill compute them apart)."""
        self.assertTrue(math.isclose(got, want, abs_tol=2e-3), (got, want))
        VLLMCheck.compared["max_abs_diff"] = max(VLLMCheck.compared["max_abs_diff"], abs(got - want))

    async def check_sequence(self, tokens, masks, logprobs, prompt_ids):
        """``tokens`` = the prompt's ids + a completion; masks and logprobs as Atropos lays them
        out; every completion logprob equal to vLLM's own for that token after that prefix."""
        n_prompt = len(prompt_ids)
        self.assertEqual(tokens[:n_prompt], prompt_ids)
        output = tokens[n_prompt:]
        self.assertTrue(output)
        self.assertEqual(masks, [-100] * n_prompt + output)
        self.assertEqual(logprobs[:n_prompt], [1.0] * n_prompt)
        self.assertEqual(len(logprobs), len(tokens))
        scored = await self.score(tokens)
        for got, want in zip(logprobs[n_prompt:], scored[n_prompt:]):
            self.assert_same_logprob(got, want)
        VLLMCheck.compared["nodes"] += 1
        VLLMCheck.compared["tokens"] += len(tokens)
        VLLMCheck.compared["logprobs"] += len(output)


class RealVLLMTests(VLLMCheck):
    """ManagedServer over servers A and B (server_type "vllm": a 404 on /generate, then vLLM's
    OpenAI /v1/completions), every token and logprob checked against vLLM itself."""

    async def asyncSetUp(self):
        await super().asyncSetUp()
        configs = [APIServerConfig(base_url=url, api_key=self.vllm["ATROPOS_VLLM_API_KEY"], timeout=60,
                                   model_name=self.vllm["ATROPOS_VLLM_MODEL"], server_type="vllm") for url in self.urls]
        self.manager = ServerManager(configs, max_n_completions=3)

    async def asyncTearDown(self):
        await self.manager.close()
        await super().asyncTearDown()

    async def check_nodes(self, nodes, prompt_ids):
        for node in nodes:
            await self.check_sequence(node.tokens, node.masked_tokens, node.logprobs, prompt_ids)

    async def test_greedy_completion_nodes_hold_exactly_the_ids_vllm_generated(self):
        prompt = "Slurm runs jobs on nodes"
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        async with self.manager.managed_server(tokenizer=self.tokenizer) as managed:
            # top_k=1: greedy, yet n > 1 is allowed (vLLM refuses n > 1 at temperature 0); split 3 + 1
            resp = await managed.completion(prompt=prompt, n=4, max_tokens=12, temperature=1.0, top_k=1,
                                            ignore_eos=True)
            nodes = managed.get_state()["nodes"]
        self.assertEqual(len(nodes), 4)
        # A direct request for the same thing: vLLM's own output ids (return_token_ids) and logprobs.
        direct = await self.direct.completion(prompt=prompt_ids, max_tokens=12, temperature=0.0, ignore_eos=True,
                                              return_token_ids=True, logprobs=0)
        want_ids = direct.choices[0].token_ids
        self.assertEqual(len(want_ids), 12)
        for node, choice in zip(nodes, resp.choices):
            self.assertEqual(node.tokens, prompt_ids + want_ids)
            for got, want in zip(node.logprobs[len(prompt_ids):], direct.choices[0].logprobs.token_logprobs):
                self.assert_same_logprob(got, want)
            self.assertEqual(choice.text, self.tokenizer.decode(want_ids, skip_special_tokens=True))
            self.assertEqual(node.metadata, {"finish_reason": "length"})
        await self.check_nodes(nodes, prompt_ids)

    async def test_sampled_chat_with_n_split_nodes_carry_vllms_logprobs(self):
        messages = [{"role": "user", "content": "hello there"}]
        async with self.manager.managed_server(tokenizer=self.tokenizer) as managed:
            resp = await managed.chat_completion(messages=messages, n=7, max_tokens=10, temperature=1.0)
            nodes = managed.get_state()["nodes"]
        prompt_ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True), add_special_tokens=True)
        # The prompt is what vLLM's own chat path makes of these messages.
        self.assertEqual(prompt_ids, post_root(self.urls[1], "/tokenize", {
            "model": self.vllm["ATROPOS_VLLM_MODEL"], "messages": messages, "add_generation_prompt": True})["tokens"])
        self.assertEqual(len(nodes), 7)
        self.assertEqual([c.index for c in resp.choices], list(range(7)))
        for node, choice in zip(nodes, resp.choices):
            self.assertEqual(choice.message.content, self.tokenizer.decode(node.tokens[len(prompt_ids):],
                                                                           skip_special_tokens=True))
        await self.check_nodes(nodes, prompt_ids)

    async def test_second_turn_extends_the_first_node(self):
        async with self.manager.managed_server(tokenizer=self.tokenizer) as managed:
            # The second turn's prompt is the first node's text and more, so it extends that node.
            await managed.completion(prompt="Once upon a time", max_tokens=6, temperature=1.0, ignore_eos=True)
            first = managed.get_state()["nodes"][0]
            await managed.completion(prompt=first.full_text + " The end.", max_tokens=6, temperature=1.0,
                                     ignore_eos=True)
            nodes = managed.get_state()["nodes"]
        self.assertEqual(len(nodes), 1)
        node = nodes[0]
        suffix = self.tokenizer.encode(" The end.", add_special_tokens=False)
        n_first = len(first.tokens)
        self.assertEqual(node.tokens[:n_first + len(suffix)], first.tokens + suffix)
        self.assertEqual(node.masked_tokens[:n_first], first.masked_tokens)  # turn 1's completion still trainable
        self.assertEqual(node.masked_tokens[n_first:n_first + len(suffix)], [-100] * len(suffix))
        scored = await self.score(node.tokens)
        trained = [i for i, m in enumerate(node.masked_tokens) if m != -100]
        self.assertEqual(len(trained), 12)
        for i in trained:
            self.assert_same_logprob(node.logprobs[i], scored[i])
        VLLMCheck.compared["nodes"] += 1
        VLLMCheck.compared["tokens"] += len(node.tokens)
        VLLMCheck.compared["logprobs"] += len(trained)

    async def test_get_logprobs_are_vllms_prompt_logprobs(self):
        prompt_ids = self.tokenizer.encode("Tokens, logprobs, and usage.")
        result = await self.manager.get_logprobs(input_ids=prompt_ids, top_k=3)
        self.assertEqual(result["prompt_tokens"], prompt_ids)
        self.assertEqual(len(result["prompt_topk_token_ids"]), len(prompt_ids))
        self.assertEqual(result["prompt_topk_token_ids"][0], [])
        scored = await self.score(prompt_ids)
        for position in range(1, len(prompt_ids)):
            ids, lps = result["prompt_topk_token_ids"][position], result["prompt_topk_logprobs"][position]
            self.assertIn(len(ids), (3, 4))  # the top 3, plus the prompt's own token when not among them
            self.assertIn(prompt_ids[position], ids)
            self.assert_same_logprob(lps[ids.index(prompt_ids[position])], scored[position])
            VLLMCheck.compared["logprobs"] += 1

    async def test_text_prompt_is_tokenized_by_the_server(self):
        prompt, outputs, logprobs, reasons = await self.manager.tokens_and_logprobs_completion(
            prompt="hello there", max_tokens=5, ignore_eos=True)
        self.assertEqual(prompt, self.tokenizer.encode("hello there"))
        self.assertEqual((len(outputs[0]), len(logprobs[0]), reasons), (5, 5, ["length"]))


class AtroposBaseEnvTests(VLLMCheck):
    """Atropos' own ``BaseEnv`` (atroposlib 0.4.0) after ``patch_atropos()``, running the
    collect_trajectories pattern of its gsm8k_server environment (``managed_server`` chat with
    ``n`` = group size) and of math_server_zero (``managed_server`` completion) against vLLM,
    and Atropos' ``process`` subcommand through ``run-env`` (``tests/atropos/managed_env.py``).
    Run under the Atropos venv: ``bash tests/atropos/setup.sh`` then
    ``/opt/atropos-env-venv/bin/python -m pytest tests/test_managed.py``."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_atroposlib("atroposlib.envs.base")
        import atropos_slurm
        atropos_slurm.patch_atropos()

    def make_env(self, group_size):
        from atroposlib.envs.base import BaseEnv, BaseEnvConfig
        from atroposlib.envs.server_handling.server_baseline import APIServerConfig as AtroposServerConfig

        class TinyManagedEnv(BaseEnv):
            name = "tiny_managed"

            async def setup(self):
                pass

            async def get_next_item(self):
                return {"question": "What is 2 + 2?"}

            async def evaluate(self, *args, **kwargs):
                pass

            async def collect_trajectories(self, item):  # as environments/gsm8k_server.py
                async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                    chat_completions = await managed.chat_completion(
                        messages=[{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": item["question"]}],
                        n=self.config.group_size, max_tokens=self.config.max_token_length, temperature=1.0)
                    state = managed.get_state()
                    nodes = state["nodes"]
                group = {"tokens": [], "masks": [], "scores": [], "inference_logprobs": []}
                for i, chat_completion in enumerate(chat_completions.choices):
                    group["tokens"].append(nodes[i].tokens)
                    group["masks"].append(nodes[i].masked_tokens)
                    group["inference_logprobs"].append(nodes[i].logprobs)
                    group["scores"].append(1.0 if "4" in chat_completion.message.content else -1.0)
                return group, []

            async def collect_completions(self, prompt):  # as environments/math_server_zero.py
                async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                    completion = await managed.completion(prompt=prompt, n=self.config.group_size,
                                                          max_tokens=self.config.max_token_length, temperature=1.0)
                    nodes = managed.get_state()["nodes"]
                return completion, nodes

        config = BaseEnvConfig(tokenizer_name=self.tokenizer_dir, group_size=group_size,
                               max_token_length=8, use_wandb=False, data_path_to_save_groups=None)
        servers = [AtroposServerConfig(model_name=self.vllm["ATROPOS_VLLM_MODEL"], base_url=url, server_type="vllm",
                                       api_key=self.vllm["ATROPOS_VLLM_API_KEY"], timeout=60) for url in self.urls]
        env = TinyManagedEnv(config, servers, slurm=False, testing=False)
        return env

    async def test_gsm8k_pattern_chat_group_through_base_env(self):
        import atropos_slurm
        env = self.make_env(group_size=10)  # over Atropos' default max_n_completions of 8: split 8 + 2
        self.assertIsInstance(env.server, atropos_slurm.ServerManager)
        try:
            group, backlog = await env.collect_trajectories(await env.get_next_item())
        finally:
            await env.server.close()
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
        prompt_ids = env.tokenizer.encode(env.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True))
        self.assertEqual((len(group["tokens"]), backlog), (10, []))
        for tokens, masks, logprobs in zip(group["tokens"], group["masks"], group["inference_logprobs"]):
            await self.check_sequence(tokens, masks, logprobs, prompt_ids)

    async def test_math_zero_pattern_completion_group_through_base_env(self):
        env = self.make_env(group_size=3)
        try:
            completion, nodes = await env.collect_completions("Question: 1 + 1 =")
        finally:
            await env.server.close()
        prompt_ids = env.tokenizer.encode("Question: 1 + 1 =")
        self.assertEqual([c.index for c in completion.choices], [0, 1, 2])
        for choice, node in zip(completion.choices, nodes):
            self.assertEqual(node.full_text, "Question: 1 + 1 =" + choice.text)
            self.assertEqual(node.metadata["finish_reason"], choice.finish_reason)
            await self.check_sequence(node.tokens, node.masked_tokens, node.logprobs, prompt_ids)


    async def test_process_subcommand_through_run_env_writes_complete_groups(self):
        """Atropos' own ``process`` subcommand (its CLI, its jsonl writer) through ``run-env``, on
        servers A and B (server_type vllm: /generate 404s, then /v1/completions with token ids)."""
        work = tempfile.mkdtemp(prefix="managed-process-")
        self.addCleanup(shutil.rmtree, work, True)
        out = os.path.join(work, "groups.jsonl")
        group_size, steps = 5, 2
        command = [sys.executable, "-m", "atropos_slurm", "run-env", os.path.join(HERE, "atropos", "managed_env.py"),
                   "process", "--env.data_path_to_save_groups", out, "--env.total_steps", str(steps),
                   "--env.group_size", str(group_size), "--openai.base_url", self.urls[0],
                   "--openai.model_name", self.vllm["ATROPOS_VLLM_MODEL"], "--openai.server_type", "vllm",
                   "--openai.timeout", "120"]
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), TINY_TOKENIZER_DIR=self.tokenizer_dir,
                   TINY_API_KEY=self.vllm["ATROPOS_VLLM_API_KEY"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=work, TOKENIZERS_PARALLELISM="false")
        env.pop("TINY_BASE_URL", None)
        result = await asyncio.to_thread(subprocess.run, command,
                                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        with open(out) as f:
            groups = [json.loads(line) for line in f]
        self.assertEqual(len(groups), steps)
        questions = ["hello world", "what is the answer?"]  # tiny_envs.QUESTIONS, in order
        for group, question in zip(groups, questions):
            for key in ("tokens", "masks", "scores", "inference_logprobs", "messages"):
                self.assertEqual(len(group[key]), group_size, key)
            messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
            prompt_ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True))
            for tokens, masks, logprobs, chat in zip(group["tokens"], group["masks"], group["inference_logprobs"],
                                                     group["messages"]):
                self.assertEqual(chat[:2], messages)
                self.assertEqual(chat[2]["content"], self.tokenizer.decode(tokens[len(prompt_ids):],
                                                                           skip_special_tokens=True))
                await self.check_sequence(tokens, masks, logprobs, prompt_ids)


class AtroposControlTests(VLLMCheck):
    """The control: Atropos' own ``ManagedServer`` over its ``VLLMServer`` and ours, each against a
    fake of Atropos' ``/generate`` server, run the same calls: the same requests reach the
    server and the same nodes and choices come back."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_atroposlib("atroposlib.envs.server_handling.vllm_server")

    async def run_calls(self, managed):
        chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        replies = [await managed.chat_completion(messages=chat, n=2, max_tokens=3, temperature=1.0)]
        replies.append(await managed.completion(prompt="Once upon", max_tokens=2, stop=["\n"]))
        extended = managed.get_state()["nodes"][-1].full_text + " more"
        replies.append(await managed.completion(prompt=extended, max_tokens=4))
        choices = [(r.object, c.index, c.finish_reason, c.message.content if r.object == "chat.completion" else c.text)
                   for r in replies for c in r.choices]
        return choices, [node.model_dump() for node in managed.get_state()["nodes"]]

    async def test_vllm_type_same_requests_nodes_and_choices_as_atropos_own_managed_server(self):
        from atroposlib.envs.server_handling.vllm_server import VLLMServer
        await self.compare("vllm", "atropos", VLLMServer)

    async def test_sglang_type_same_requests_nodes_and_choices_as_atropos_own_managed_server(self):
        from atroposlib.envs.server_handling.sglang_server import SGLangServer
        await self.compare("sglang", "sglang", SGLangServer)

    async def compare(self, server_type, shape, atropos_server_class):
        from atroposlib.envs.server_handling.managed_server import ManagedServer as AtroposManagedServer
        from atroposlib.envs.server_handling.server_baseline import APIServerConfig as AtroposServerConfig

        theirs, ours = await fake(self, TokenShapes(shape)), await fake(self, TokenShapes(shape))
        config = AtroposServerConfig(base_url=theirs.url, model_name="m", tokenizer_name=self.tokenizer_dir,
                                     server_type=server_type, timeout=10, health_check=False, api_key="x")
        their_choices, their_nodes = await self.run_calls(
            AtroposManagedServer(server=atropos_server_class(config), tokenizer=self.tokenizer))
        manager = ServerManager([APIServerConfig(base_url=ours.url, model_name="m", server_type=server_type,
                                                 timeout=10, api_key="x")])
        self.addAsyncCleanup(manager.close)
        async with manager.managed_server(tokenizer=self.tokenizer) as managed:
            our_choices, our_nodes = await self.run_calls(managed)
        self.assertEqual([(r.path, r.json()) for r in ours.posts], [(r.path, r.json()) for r in theirs.posts])
        self.assertEqual(len(ours.posts), 3)
        self.assertEqual(our_choices, their_choices)
        self.assertEqual(len(our_nodes), 3)  # two chat choices, then one completion node extended in place
        self.assertEqual(our_nodes[:2], their_nodes[:2])
        # The one difference (README): Atropos' completion() masks the whole extended prompt, so
        # the first turn's completion, whose own node was replaced, is trained nowhere; ours
        # keeps it unmasked, as Atropos' chat_completion() does.
        ours_ext, theirs_ext = our_nodes[2], their_nodes[2]
        for key in ("full_text", "tokens", "metadata"):
            self.assertEqual(ours_ext[key], theirs_ext[key])
        first_turn = [i for i, m in enumerate(ours_ext["masked_tokens"][:-4]) if m != -100]
        self.assertEqual(len(first_turn), 2)  # the 2 tokens of "Once upon"'s completion
        for i, (mine, atropos) in enumerate(zip(ours_ext["masked_tokens"], theirs_ext["masked_tokens"])):
            self.assertEqual(atropos, -100 if i in first_turn else mine)
        for i, (mine, atropos) in enumerate(zip(ours_ext["logprobs"], theirs_ext["logprobs"])):
            self.assertEqual(atropos, 1.0 if i in first_turn else mine)


VENV = os.environ.get("ATROPOS_VENV", "/opt/atropos-env-venv")
IN_VENV_CLASSES = ("RealVLLMTests", "AtroposBaseEnvTests", "AtroposControlTests")

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("atroposlib") is None:
    # This Python lacks them: the classes above run in the Atropos venv instead, through one test.
    del RealVLLMTests, AtroposBaseEnvTests, AtroposControlTests, VLLMCheck

    class ManagedInAtroposVenv(unittest.TestCase):
        def test_the_vllm_and_base_env_tests_pass_in_the_atropos_venv(self):
            python = os.path.join(VENV, "bin", "python")
            require("atroposlib", os.access(python, os.X_OK),
                    f"bash tests/atropos/setup.sh makes the venv {VENV} (or set ATROPOS_VENV)")
            result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                                     os.path.abspath(__file__), "-k", " or ".join(IN_VENV_CLASSES)],
                                    cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=900)
            lines = result.stdout.strip().splitlines()
            tail = "\n".join(lines[-30:]) + "\n" + result.stderr[-2000:]
            self.assertEqual(result.returncode, 0, tail)
            self.assertRegex(lines[-1], r"^=* ?\d+ passed", tail)
            self.assertNotRegex(lines[-1], r"failed|skipped|error", tail)


if __name__ == "__main__":
    unittest.main()
