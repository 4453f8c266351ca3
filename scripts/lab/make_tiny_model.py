#!/usr/bin/env python3
"""Make a tiny random-weight Llama model for the lab, entirely offline.

Real vLLM needs a real model directory (config, safetensors weights, tokenizer, chat template)
but the lab has no model hub and two CPU cores. This writes a ~3 MB Llama with random weights
(fixed seed, so greedy answers are the same on every run and every machine), a byte-level BPE
tokenizer trained here on a small built-in text, and a chat template. The answers are gibberish;
what matters is that vLLM loads it, shards it (TP/PP) and serves it like any other Llama.

Usage: make_tiny_model.py OUT_DIR [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

SEED = 1234
VOCAB_SIZE = 512
# head_dim = hidden / heads = 32: vLLM's CPU attention rejects 16.
SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Training text for the tokenizer: varied enough for a few hundred merges, written here.
CORPUS = """
A cluster is a set of machines that share a scheduler and a filesystem.
The scheduler gives each job a set of nodes for a limited time.
Every node runs one program; the first node is the head and the others join it.
The head starts the model server when all nodes have joined.
Tensor parallelism splits each layer across devices; pipeline parallelism splits the layers.
A request arrives, the tokens are computed, and the answer goes back to the client.
What is the capital of France? Paris is the capital of France.
Say hello to the world. Hello, world! How are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog while the small cat sleeps in the sun.
Numbers: zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9.
Count to ten, then tell me a short story about a robot who learns to paint.
Once upon a time there was a tiny model that answered every question with confidence.
"""


def train_tokenizer() -> Any:
    """Train a byte-level BPE tokenizer on CORPUS, so no vocabulary file is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in CORPUS.splitlines() if line] * 4, trainer=trainer)
    return tok


def make(out: Path) -> None:
    """Write the model directory to ``out`` (atomically: built aside, then renamed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    tok = train_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    vocab = tok.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("</s>"),
        tie_word_embeddings=False,
        dtype="float32",
        **SHAPE,
    )
    model = LlamaForCausalLM(config)
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        # Some loaders read the template from its own file; write it there too.
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "tiny-model.json").write_text(
            json.dumps({"seed": SEED, "parameters": params, "vocab_size": vocab, **SHAPE}, indent=2) + "\n"
        )
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"tiny model: {out} ({params} parameters, vocabulary {vocab})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="model directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists() and not args.force:
        print(f"tiny model: {args.out} exists (use --force to replace it)")
        return 0
    make(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
