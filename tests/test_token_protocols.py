"""Every token protocol's reader against thousands of mutated answers (standard library only).

Valid answers are made in each protocol's shape (vLLM ``/v1/completions`` with token ids,
Atropos' ``/generate``, SGLang's ``/generate``; completions and prompt scoring; token-id and
text prompts), with a fixed seed.  Each case mutates one of them once, at a random place, as a
hostile or version-skewed server might answer: a list element dropped, duplicated or the list emptied or
extended, two fields swapped, a key dropped or added or the keys reordered, a value retyped to
string, boolean, null or float, NaN, infinity, negated, ``-100``, huge, ``2**31`` or the
tokenizer's size, a token id spelled ``" 7"``, ``"+7"``, ``"1_0"`` or in non-ASCII digits, a value
wrapped in a list or an object, or a finish reason made ``abort``.  The mutated answer goes
through JSON text (so ``NaN`` is the literal) and ``decode_token_answer``, then the protocol's
reader.  Every case must end in exactly one of:

* the same result as the valid answer (the mutation was harmless: key order, an unread field);
* ``TokenProtocolError``, a one-line message that names the server;
* ``GenerationAbortedError``, only when a finish reason was made ``abort`` (retried like a 5xx).

Never another exception, never different data.  Mutations that make another *valid* answer
(another id below the vocabulary size, another finish-reason string, a permuted list, a
shorter SGLang output, whose ids come only with their logprobs; two mutations that agree, such
as one token dropped from both lists) are not made: no reader can tell them from the server's
truth.  (Run with other seeds and 2,000 cases per shape while writing it: 288,000 cases.)
"""

import copy
import json
import os
import random
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from atropos_slurm import (  # noqa: E402
    AtroposGenerateTokens,
    GenerationAbortedError,
    SGLangGenerateTokens,
    TokenProtocolError,
    TokenReader,
    VLLMCompletionsTokens,
    decode_token_answer,
)

URL = "http://10.0.0.7:9000/v1"
SEED = 20261206
CASES_PER_SHAPE = 500
DIGITS = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


class Shape:
    """One valid answer and what its reader is told, with the places mutations must spare.

    ``length_free``: paths of lists whose length no reader can check (a shorter list is a valid
    other answer); ``reasons``: paths of finish reasons (for the abort mutation).
    """

    def __init__(self, protocol, scoring, data, n, vocab, prompt, top_k, length_free=(), reasons=()):
        self.protocol, self.scoring, self.data = protocol, scoring, data
        self.reader_args = dict(n=n, vocab=vocab, prompt=prompt, top_k=top_k)
        self.length_free, self.reasons = set(length_free), list(reasons)

    def read(self, data):
        """The reader's result; SGLang's finish-reason objects, returned as sent, compared by type
        (their other fields, ``matched``, ``length``, are the server's and not read)."""
        reader = TokenReader(self.protocol.name, URL, **self.reader_args)
        body = json.dumps(data, allow_nan=True).encode()
        if self.scoring:
            return self.protocol.logprobs_result(decode_token_answer(body, URL), reader)
        prompt, outputs, logprobs, reasons = self.protocol.completion_result(decode_token_answer(body, URL), reader)
        return prompt, outputs, logprobs, [r["type"] if isinstance(r, dict) else r for r in reasons]


def logprob(rng):
    return rng.choice([-9999.0, -round(rng.uniform(0.0001, 30), 6), -round(rng.uniform(0.0001, 1), 6)])


def make_shape(rng, protocol, scoring, text_prompt):
    vocab = rng.choice([None, rng.randrange(40, 5000)])
    limit = vocab or 100000
    prompt_ids = [rng.randrange(limit) for _ in range(rng.randrange(1, 6))]
    prompt = "some text" if text_prompt else list(prompt_ids)
    n = 1 if scoring else rng.randrange(1, 4)
    top_k = rng.randrange(1, 4) if scoring else 0
    outputs = [[rng.randrange(limit) for _ in range(rng.randrange(0, 5))] for _ in range(n)]
    lps = [[logprob(rng) for _ in out] for out in outputs]
    reasons = [rng.choice(["stop", "length"]) for _ in range(n)]

    def topk(i, form):
        """Position i's top_k distinct ids (the prompt's own first) in ``form``; None at 0."""
        if i == 0:
            return None
        ids = [prompt_ids[i]] + [t for t in range(top_k) if t != prompt_ids[i]][:top_k - 1]
        values = [logprob(rng) for _ in ids]
        if form == "vllm":
            return {str(t): {"logprob": v, "rank": r + 1, "decoded_token": "x"}
                    for r, (t, v) in enumerate(zip(ids, values))}
        if form == "dict":
            return {str(t): v for t, v in zip(ids, values)}
        if form == "dicts":
            return [{str(t): v} for t, v in zip(ids, values)]
        return [[v, t, None] for t, v in zip(ids, values)]

    length_free, reason_paths = [], []
    if isinstance(protocol, VLLMCompletionsTokens):
        if scoring:
            choice = {"index": 0, "text": "", "finish_reason": "length", "stop_reason": None,
                      "logprobs": None, "prompt_logprobs": [topk(i, "vllm") for i in range(len(prompt_ids))]}
            if text_prompt:
                choice["prompt_token_ids"] = list(prompt_ids)
            data = {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice],
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 1}}
        else:
            choices = []
            for c in range(n):
                choice = {"index": c, "text": "", "finish_reason": reasons[c], "stop_reason": None,
                          "logprobs": {"tokens": [f"token_id:{t}" for t in outputs[c]], "token_logprobs": lps[c],
                                       "top_logprobs": [{f"token_id:{t}": v} for t, v in zip(outputs[c], lps[c])],
                                       "text_offset": list(range(len(outputs[c])))}}
                if text_prompt:
                    choice["prompt_token_ids"] = list(prompt_ids)
                choices.append(choice)
            order = list(range(n))
            rng.shuffle(order)  # vLLM may send choices in any order
            data = {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choices[i] for i in order]}
            reason_paths = [("choices", i, "finish_reason") for i in range(n)]
            if text_prompt and n == 1:
                length_free.append(("choices", 0, "prompt_token_ids"))
    elif isinstance(protocol, AtroposGenerateTokens):
        if scoring:
            positions = [topk(i, rng.choice(["dict", "dicts"])) for i in range(len(prompt_ids))]
            data = {"text": [""], "finish_reasons": ["length"],
                    "prompt_logprobs": rng.choice([positions, [positions]])}
            if text_prompt:
                data["prompt_token_ids"] = list(prompt_ids)
        else:
            data = {"text": [""] * n, "prompt": "", "finish_reasons": reasons, "prompt_token_ids": list(prompt_ids),
                    "logprobs": [[[{str(t): v}] for t, v in zip(outputs[c], lps[c])] for c in range(n)],
                    "token_ids": [list(out) for out in outputs]}
            reason_paths = [("finish_reasons", c) for c in range(n)]
            if text_prompt:
                length_free.append(("prompt_token_ids",))
    else:
        def sglang_reason(reason):
            detail = {"length": 3} if reason == "length" else {"matched": 2}
            return rng.choice([reason, dict(type=reason, **detail)])

        results = []
        for c in range(n):
            meta = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(outputs[c]),
                    "finish_reason": sglang_reason(reasons[c]),
                    "output_token_logprobs": [[v, t, None] for t, v in zip(outputs[c], lps[c])]}
            if scoring or text_prompt:
                meta["input_token_logprobs"] = [[None if i == 0 else logprob(rng), t, None]
                                                for i, t in enumerate(prompt_ids)]
            elif rng.random() < 0.8:  # from SGLang's default logprob_start_len: the last prompt id, or none
                meta["input_token_logprobs"] = rng.choice([[[None, prompt_ids[-1], None]], []])
            if scoring:
                meta["input_top_logprobs"] = [topk(i, "sglang") for i in range(len(prompt_ids))]
            results.append({"text": "", "output_ids": list(outputs[c]), "meta_info": meta})
        data = results if n > 1 or rng.random() < 0.2 else results[0]
        prefix = (lambda c: (c, "meta_info")) if isinstance(data, list) else (lambda c: ("meta_info",))
        reason_paths = [prefix(c) + ("finish_reason",) for c in range(n)]
        length_free = [prefix(c) + ("output_token_logprobs",) for c in range(n)]
        if text_prompt and not scoring:
            length_free += [prefix(c) + ("input_token_logprobs",) for c in range(n)]
    return Shape(protocol, scoring, data, n, vocab, prompt, top_k, length_free, reason_paths)


# -- mutations ----------------------------------------------------------------------------------


def nodes(value, path=()):
    """Every (path, value) in the JSON tree, the root included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from nodes(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nodes(item, path + (i,))


def get(data, path):
    for key in path:
        data = data[key]
    return data


def put(data, path, value):
    if not path:
        return value
    get(data, path[:-1])[path[-1]] = value
    return data


def is_map(value):
    """A JSON object keyed by token ids: its order and its values are the server's statement."""
    return isinstance(value, dict) and value and all(k.isdigit() for k in value)


def token_text(value):
    return isinstance(value, str) and (value.isdigit() or value.startswith("token_id:"))


def spoiled_ids(text, bound):
    """``text``, a token id in digits (``"7"``, ``"token_id:7"``), spelled in ways no reader may take."""
    head, _, digits = text.rpartition(":")
    head = head + ":" if head else ""
    spellings = [" " + digits, digits + " ", "+" + digits, "-" + digits, digits + "_0", "-100", "", str(bound),
                 "9" * 40, digits + ".0", "0x1", digits.translate(DIGITS) or "٣"]
    return [head + s for s in spellings] + ([digits] if head else [])


def kind_of(value):
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def mutate(rng, shape, data):
    """One random mutation of ``data`` in place (the new root returned) and its kind."""
    if shape.reasons and rng.random() < 0.05:
        path = rng.choice(shape.reasons)
        try:
            return put(data, path, rng.choice(["abort", {"type": "abort", "message": "paused"}])), "abort"
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation moved it
    path, value = rng.choice(list(nodes(data)))
    bound = shape.reader_args["vocab"] or 2 ** 31
    if isinstance(value, dict):
        keys = list(value)
        options = ["wrap_list", "wrap_object", "add_key"]
        if keys:
            options += ["drop_key", "retype"]
        if len(keys) > 1 and not is_map(value):
            options += ["reorder", "swap"]
        if is_map(value):
            options += ["spoil_key"]
        kind = rng.choice(options)
        if kind == "drop_key":
            del value[rng.choice(keys)]
        elif kind == "add_key":
            value["unknown_field"] = rng.choice([None, 1, "x", [1]])
        elif kind == "reorder":
            items = list(value.items())
            rng.shuffle(items)
            value.clear()
            value.update(items)
        elif kind == "swap":  # two values of different kinds: two lists of numbers would be a valid other answer
            pairs = [(a, b) for a in keys for b in keys if a < b and kind_of(value[a]) != kind_of(value[b])]
            if pairs:
                a, b = rng.choice(pairs)
                value[a], value[b] = value[b], value[a]
        elif kind == "spoil_key":
            key = rng.choice(keys)
            new = rng.choice([k for k in spoiled_ids(key, bound) if isinstance(k, str)])
            items = [((new if k == key else k), v) for k, v in value.items()]
            value.clear()
            value.update(items)
        elif kind == "retype":
            data = put(data, path, rng.choice(["", True, None, 1.5, 3]))  # no text: it could be a finish reason
        else:
            data = put(data, path, [value] if kind == "wrap_list" else {"value": value})
        return data, kind
    if isinstance(value, list):
        options = ["wrap_list", "wrap_object", "retype"]
        if path not in shape.length_free:
            options += ["append", "empty"] + (["drop", "duplicate"] if value else [])
        if len(value) == 1:
            options.append("unwrap")
        if len({type(v) for v in value}) > 1 and not any(isinstance(v, (list, dict)) for v in value):
            # a tuple-like list, [logprob, id, text], not a list of positions
            options.append("swap")
        kind = rng.choice(options)
        if kind == "drop":
            del value[rng.randrange(len(value))]
        elif kind == "duplicate":
            i = rng.randrange(len(value))
            value.insert(i, copy.deepcopy(value[i]))
        elif kind == "append":
            value.append(rng.choice([None, 0, -1.0, "x", [], {}]))
        elif kind == "empty":
            value.clear()
        elif kind == "swap":
            i, j = rng.sample(range(len(value)), 2)
            value[i], value[j] = value[j], value[i]
        elif kind == "unwrap":
            data = put(data, path, value[0])
        elif kind == "retype":
            data = put(data, path, rng.choice(["", True, None, 0, {}]))
        else:
            data = put(data, path, [value] if kind == "wrap_list" else {"value": value})
        return data, kind
    if isinstance(value, bool) or value is None:
        new = rng.choice([0, 1, "", "null", [], {}]) if value is None else (not value)
    elif isinstance(value, int):
        new = rng.choice([str(value), True, False, None, float(value), float("nan"), -100, 10 ** 30, bound, [value],
                          {"id": value}] + ([-value - 1] if value >= 0 else []))
    elif isinstance(value, float):  # made positive, never another negative number
        new = rng.choice([str(value), True, None, float("nan"), float("inf"), float("-inf"), 1e308, [value],
                          {"logprob": value}] + ([-value] if value < 0 else []))
    elif token_text(value):
        new = rng.choice(spoiled_ids(value, bound) + [True, None, [value]])
    else:  # free text (a finish reason, a text field): retyped, never another string
        new = rng.choice([5, True, None, [value], {"value": value}])
    return put(data, path, new), "value"


class PropertyTest(unittest.TestCase):
    def test_every_mutated_answer_is_the_valid_result_or_a_named_error(self):
        rng = random.Random(SEED)
        shapes = [(protocol, scoring, text) for protocol in (VLLMCompletionsTokens(), AtroposGenerateTokens(),
                                                              SGLangGenerateTokens())
                  for scoring in (False, True) for text in (False, True)]
        outcomes = {}
        for protocol, scoring, text in shapes:
            for case in range(CASES_PER_SHAPE):
                shape = make_shape(rng, protocol, scoring, text)
                want = shape.read(copy.deepcopy(shape.data))
                data, kind = mutate(rng, shape, copy.deepcopy(shape.data))
                kinds = [kind]
                label = f"{protocol.name} scoring={scoring} text={text} case {case} {kinds}:\n" \
                        f"valid:   {json.dumps(shape.data)}\nmutated: {json.dumps(data)}"
                try:
                    got = shape.read(data)
                except TokenProtocolError as e:
                    message = str(e)
                    self.assertTrue(message.startswith(URL + ": ") and "\n" not in message and len(message) < 600,
                                    f"{label}\n{message}")
                    outcome = "TokenProtocolError"
                except GenerationAbortedError:
                    self.assertIn("abort", kinds, label)
                    outcome = "GenerationAbortedError"
                except Exception as e:  # noqa: BLE001 - the property: no other exception
                    self.fail(f"{label}\nraised {type(e).__name__}: {e}")
                else:
                    self.assertEqual(got, want, label)
                    outcome = "same result"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        total = sum(outcomes.values())
        sys.stderr.write(f"\n[test_token_protocols] {total} mutated answers: {outcomes}\n")
        self.assertEqual(total, len(shapes) * CASES_PER_SHAPE)
        for outcome in ("same result", "TokenProtocolError", "GenerationAbortedError"):
            self.assertGreater(outcomes.get(outcome, 0), total // 100, outcomes)  # each way is exercised


if __name__ == "__main__":
    unittest.main()
