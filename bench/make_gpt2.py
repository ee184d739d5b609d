"""Write a GPT-2-small-sized model with random weights, and a tokenizer, to a directory.

For bench/gpu.sh on a machine without Hugging Face hub access: the model is
``GPT2Config()`` (12 layers, 12 heads, 768 wide, 1,024 positions, 50,257-token vocabulary:
GPT-2 small's shapes, so its step costs are GPT-2 small's), randomly initialised with a
fixed seed. The tokenizer is GPT-2's own when ``--tokenizer gpt2`` can load it (hub or local
cache), otherwise a byte-level BPE trained here on the summarization training texts. Random
weights make the generated text meaningless but leave speed, and the ours/PEFT identity
check, intact.

Usage: python bench/make_gpt2.py OUT_DIR [--tokenizer local|gpt2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def local_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the summarization training data (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not common.TRAIN_FILE.is_file():
        sys.exit(f"{common.TRAIN_FILE} not found; set SOFTPROMPT_DATA to the folder holding "
                 f"summarization/train.jsonl")
    texts = []
    for line in common.TRAIN_FILE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["source"], row["target"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["Summary:"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", choices=["local", "gpt2"], default="local")
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    config = GPT2Config()  # GPT-2 small
    tokenizer = None
    if args.tokenizer == "gpt2":
        try:
            tokenizer = AutoTokenizer.from_pretrained("gpt2")
        except OSError as exc:
            print(f"GPT-2 tokenizer not available ({exc}); training a local one", file=sys.stderr)
    if tokenizer is None:
        tokenizer = local_tokenizer(config.vocab_size)
    eos = tokenizer.eos_token_id
    config.bos_token_id = config.eos_token_id = eos
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # float32; the benchmarks load it as bfloat16
    tokenizer.save_pretrained(args.out)
    print(f"wrote GPT-2 small ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, random weights), tokenizer with {len(tokenizer)} tokens, to {args.out}")


if __name__ == "__main__":
    main()
