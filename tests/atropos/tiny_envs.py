"""Small Atropos environments, written the way Atropos' own ones are, for tests/test_atropos_envs.py.

Each is a real ``atroposlib`` ``BaseEnv`` with in-memory data and a tokenizer built locally
(``TINY_TOKENIZER_DIR``, see ``make_tokenizer``), talking to the servers of its config
(``TINY_BASE_URL``, or ``--openai.base_url``; its key ``TINY_API_KEY``):

* ``ChatEnv`` (as gsm8k_eval, text_reversal): ``chat_completion(n=group_size)`` per item,
  ``tokenize_for_trainer``; ``evaluate`` with ``split="eval"``; its own ``wandb_log`` metrics.
* ``CompletionEnv`` (as mcqa_thinking): ``completion(prompt=..., n=group_size)``, ``.text``.
* ``DedicatedEnv`` (as gym_taxi): a multi-turn episode per trajectory inside
  ``dedicated_server()``; tokens and masks from the chat template.
* ``ManagedEnv`` (as gsm8k_server): ``managed_server`` chat with ``n=group_size``; tokens,
  masks and ``inference_logprobs`` from its nodes (a server with token ids: ``server_type``
  vllm or sglang).

``TinyEnv.evaluate`` ends, as Atropos' environments do, with ``evaluate_log`` (the
``evaluate`` subcommand's ``metrics.json`` and ``samples.jsonl``, with
``--env.data_dir_to_save_evals``).

Run one as Atropos runs its environments: ``python tests/atropos/chat_env.py process ...``
(Atropos' own manager) or ``python -m atropos_slurm run-env tests/atropos/chat_env.py process ...``.
"""

import os
import sys
import time
from typing import List, Optional, Tuple

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup, ScoredDataItem
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["hello world", "what is the answer?", "one two three", "the quick brown fox", "hi, how are you?"]


def make_tokenizer(outdir: str) -> str:
    """The tiny byte-level BPE tokenizer of tests/vllm (chat template, no hub), saved to ``outdir``."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "vllm"))
    import make_tiny_model

    make_tiny_model.save_tokenizer(make_tiny_model.build_hf_tokenizer(make_tiny_model.build_tokenizer()), outdir)
    return outdir


class TinyEnv(BaseEnv):
    """What the three share: config from the environment, in-memory items, eval metrics."""

    name = "tiny"

    @classmethod
    def config_init(cls) -> Tuple[BaseEnvConfig, List[APIServerConfig]]:
        env_config = BaseEnvConfig(
            tokenizer_name=os.environ["TINY_TOKENIZER_DIR"], group_size=4, use_wandb=False, max_token_length=512,
            total_steps=2, steps_per_eval=100, wandb_name=cls.name, ensure_scores_are_not_same=False,
        )
        server_configs = [APIServerConfig(model_name="tiny", base_url=os.environ.get("TINY_BASE_URL", ""),
                                          api_key=os.environ.get("TINY_API_KEY", "x"), num_requests_for_eval=4,
                                          num_max_requests_at_once=8, health_check=False)]
        return env_config, server_configs

    async def setup(self):
        self.iter = 0
        self.eval_scores: List[float] = []

    async def get_next_item(self):
        item = {"question": QUESTIONS[self.iter % len(QUESTIONS)], "index": self.iter}
        self.iter += 1
        return item

    @staticmethod
    def score(text: str, i: int) -> float:
        return float(len(text) % 3 == i % 3)

    async def evaluate(self, *args, **kwargs):
        start, samples = time.time(), []
        for question in QUESTIONS[:3]:
            messages = [{"role": "user", "content": question}]
            resp = await self.server.chat_completion(messages=messages, n=1, max_tokens=8, temperature=0.0,
                                                     split="eval")
            reply = resp.choices[0].message.content
            self.eval_scores.append(float(reply is not None))
            samples.append({"messages": messages + [{"role": "assistant", "content": reply}],
                            "finish_reason": resp.choices[0].finish_reason, "score": self.eval_scores[-1]})
        scores = self.eval_scores[-len(samples):]
        await self.evaluate_log(metrics={"eval/percent_correct": sum(scores) / len(scores)}, samples=samples,
                                start_time=start, end_time=time.time(),
                                generation_parameters={"temperature": 0.0, "max_tokens": 8})

    async def wandb_log(self, wandb_metrics: Optional[dict] = None):
        wandb_metrics = wandb_metrics or {}
        if self.eval_scores:
            wandb_metrics["eval/percent_correct"] = sum(self.eval_scores) / len(self.eval_scores)
            self.eval_scores = []
        await super().wandb_log(wandb_metrics)


class ChatEnv(TinyEnv):
    name = "tiny_chat"

    async def collect_trajectories(self, item) -> Tuple[Optional[ScoredDataGroup], list]:
        messages = [{"role": "system", "content": "you are a helpful assistant."},
                    {"role": "user", "content": item["question"]}]
        resp = await self.server.chat_completion(messages=messages, n=self.config.group_size, max_tokens=16,
                                                 temperature=1.0)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], messages=[])
        for i, choice in enumerate(resp.choices):
            assert choice.message.tool_calls is None, "no tool was called"
            chat = messages + [{"role": "assistant", "content": choice.message.content}]
            out = tokenize_for_trainer(self.tokenizer, chat, finish_reason=choice.finish_reason)
            group["tokens"].append(out["tokens"])
            group["masks"].append(out["masks"])
            group["scores"].append(self.score(choice.message.content, i))
            group["messages"].append(chat)
        return group, []


class CompletionEnv(TinyEnv):
    name = "tiny_completion"

    async def collect_trajectories(self, item) -> Tuple[Optional[ScoredDataGroup], list]:
        prompt = f"Question: {item['question']}\nAnswer:"
        resp = await self.server.completion(prompt=prompt, n=self.config.group_size, max_tokens=16,
                                            temperature=1.0)
        prompt_tokens = self.tokenizer.encode(prompt, add_special_tokens=False)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for i, choice in enumerate(resp.choices):
            completion_tokens = self.tokenizer.encode(choice.text, add_special_tokens=False)
            group["tokens"].append(prompt_tokens + completion_tokens)
            group["masks"].append([-100] * len(prompt_tokens) + completion_tokens)
            group["scores"].append(self.score(choice.text, i))
        return group, []


class DedicatedEnv(TinyEnv):
    """One episode of ``TURNS`` turns per trajectory on a held server, as gym_taxi does."""

    name = "tiny_dedicated"
    TURNS = 3

    async def collect_trajectory(self, item) -> Tuple[Optional[ScoredDataItem], list]:
        async with self.server.dedicated_server() as server:
            messages = [{"role": "user", "content": item["question"]}]
            for turn in range(self.TURNS):
                max_tokens = self.config.max_token_length - len(
                    self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
                resp = await server.chat_completion(messages=messages, n=1, max_tokens=min(max_tokens, 16))
                messages.append({"role": "assistant", "content": resp.choices[0].message.content})
                if turn < self.TURNS - 1:
                    messages.append({"role": "user", "content": f"turn {turn + 1}: go on"})
        tokens = self.tokenizer.apply_chat_template(messages)
        masks = []
        for i, message in enumerate(messages):
            upto = self.tokenizer.apply_chat_template(messages[: i + 1])
            masks.extend(upto[len(masks):] if message["role"] == "assistant" else [-100] * (len(upto) - len(masks)))
        return ScoredDataItem(tokens=tokens, masks=masks, scores=self.score(messages[-1]["content"], item["index"]),
                              messages=messages), []


class ManagedEnv(TinyEnv):
    """gsm8k_server's pattern: ``managed_server`` chat, the group's tokens, masks and
    ``inference_logprobs`` taken from its nodes (the ids and logprobs the server generated)."""

    name = "tiny_managed"

    async def collect_trajectories(self, item) -> Tuple[Optional[ScoredDataGroup], list]:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": item["question"]}]
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            chat_completions = await managed.chat_completion(messages=messages, n=self.config.group_size,
                                                             max_tokens=8, temperature=1.0)
            state = managed.get_state()
            nodes = state["nodes"]
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[], messages=[])
        for i, choice in enumerate(chat_completions.choices):
            group["tokens"].append(nodes[i].tokens)
            group["masks"].append(nodes[i].masked_tokens)
            group["inference_logprobs"].append(nodes[i].logprobs)
            group["scores"].append(self.score(choice.message.content, i))
            group["messages"].append(messages + [{"role": "assistant", "content": choice.message.content}])
        return group, []
