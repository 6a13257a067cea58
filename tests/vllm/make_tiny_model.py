"""Build a tiny random-weight Llama model that vLLM can serve, fully offline.

    python tests/vllm/make_tiny_model.py OUTDIR [--force]

Writes into OUTDIR a Hugging Face style model directory:
  config.json, generation_config.json, model.safetensors (float32),
  tokenizer.json, tokenizer_config.json, special_tokens_map.json (as transformers writes them),
  chat_template.jinja (or the template inside tokenizer_config.json, depending on transformers).

Model: LlamaForCausalLM, hidden 64, 2 layers, 2 attention heads of head_dim 32 (vLLM's CPU
attention needs a head size of 32 or more), 1 KV head, intermediate 128; weights from
torch.manual_seed(0), so every build is identical and greedy output is deterministic.

Tokenizer: byte-level BPE trained in-process with `tokenizers` on the small text below. Its
alphabet is printable ASCII plus space and newline; any other byte maps to <unk>, so generated
text is always clean ASCII. Special tokens: <unk>, <s> (bos), <pad>, <|im_start|>,
<|im_end|> (eos). The chat template is ChatML-like.

No model hub is contacted (HF_HUB_OFFLINE=1 is set before transformers is imported).
The build is skipped when OUTDIR already holds a build made by this same script (a stamp file
holds the script's hash); --force rebuilds.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, PAD, IM_START, EOS = SPECIAL_TOKENS
VOCAB_SIZE = 320

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """\
hello world! hello there. hi, how are you? I am fine, thank you; and you?
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.
one two three four five six seven eight nine ten: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048
user: what is the answer? assistant: the answer is 42. system: you are a helpful assistant.
Question: Is this a test? Answer: Yes, this is only a test of the tiny model.
def add(a, b):
    return a + b  # comment
if (x > 0 && y < 1) { z = [1, 2, 3]; } else { z = {"k": 'v'}; }
email@example.com http://127.0.0.1:8000/v1/chat/completions?stream=true&n=2
Symbols: ~ ` ! @ # $ % ^ & * ( ) - _ = + [ ] { } \\ | ; : ' " , . < > / ?
-_=+*/\\|@#$%^&~ <> <= >= == != -> => ... --- *** ### ///
Slurm runs jobs on nodes; each node serves a model on a port. The trainer sends requests,
the servers reply with completions, and rewards are scored. Tokens, logprobs, and usage.
Once upon a time there was a small model that could only say a few words, but it tried its best.
"""


def _script_hash():
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # ByteLevel maps every byte to a printable unicode character; restrict the initial
    # alphabet to the characters of printable ASCII, space and newline.
    allowed = "".join(chr(b) for b in range(32, 127)) + "\n"
    alphabet = sorted({c for piece, _ in byte_level.pre_tokenize_str(allowed) for c in piece})
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True) * 4, trainer=trainer)
    return tok


def build_hf_tokenizer(tok):
    """The transformers tokenizer around ``tok``, with the chat template and special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(hf_tok, outdir):
    """Write the tokenizer files so that ``AutoTokenizer.from_pretrained(outdir)`` loads it offline."""
    hf_tok.save_pretrained(outdir)
    # Some transformers versions keep the template only in chat_template.jinja; put it in
    # tokenizer_config.json too so any reader finds it.
    cfg_path = os.path.join(outdir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg.setdefault("chat_template", CHAT_TEMPLATE)
    tok_cfg["bos_token"], tok_cfg["eos_token"] = BOS, EOS
    tok_cfg["unk_token"], tok_cfg["pad_token"] = UNK, PAD
    tok_cfg["add_bos_token"] = False
    tok_cfg["add_eos_token"] = False
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)


def build(outdir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    hf_tok = build_hf_tokenizer(tok)
    vocab_size = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=32,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    config.dtype = "float32"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()

    os.makedirs(os.path.dirname(os.path.abspath(outdir)) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=os.path.dirname(os.path.abspath(outdir)))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(hf_tok, tmp)
        with open(os.path.join(tmp, ".make_tiny_model.stamp"), "w") as f:
            f.write(_script_hash() + "\n")
        if os.path.isdir(outdir):
            shutil.rmtree(outdir)
        os.chmod(tmp, 0o755)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model written to {outdir}: {n_params} parameters, vocab {vocab_size}, "
          f"special token ids {ids}")


def main(argv):
    args = [a for a in argv if not a.startswith("-")]
    force = "--force" in argv
    if len(args) != 1 or any(a not in ("--force",) for a in argv if a.startswith("-")):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    outdir = args[0]
    stamp = os.path.join(outdir, ".make_tiny_model.stamp")
    if not force and os.path.exists(stamp) and os.path.exists(os.path.join(outdir, "model.safetensors")):
        with open(stamp) as f:
            if f.read().strip() == _script_hash():
                print(f"tiny model in {outdir} is up to date (use --force to rebuild)")
                return 0
    build(outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
