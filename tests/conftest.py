"""Tiny real models (GPT-2: learned positions; Llama: RoPE + GQA + BOS) built locally.

No network: the tokenizer is a small byte-level BPE trained here on our sample data, and the
models are random-initialised from configs, saved to a directory and loaded back through
softprompt.models.load_model, the same path users take.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny models gain nothing from threads; on a busy CPU they cost

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"


def _corpus() -> list[str]:
    texts = []
    for path in sorted(SAMPLES.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.extend(v for v in row.values() if isinstance(v, str))
            texts.extend(a for a in row.get("answers", []) if isinstance(a, str))
    return texts + ["Summary: Answer: Question: Context: English: German:"]


def build_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_model(kind: str, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{"gpt2": dir, "llama": dir}``: saved tiny models with their tokenizers."""
    dirs = {}
    for kind in ("gpt2", "llama"):
        tokenizer = build_tokenizer(add_bos=kind == "llama")
        model = build_model(kind, len(tokenizer))
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs[kind] = d
    return dirs


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tiny_dirs):
    """``(model, tokenizer, model_dir)`` for each tiny architecture, freshly loaded."""
    from softprompt.models import load_model

    model, tokenizer = load_model(str(tiny_dirs[request.param]))
    return model, tokenizer, tiny_dirs[request.param]


@pytest.fixture
def samples() -> Path:
    return SAMPLES


# A real headless Chromium (Debian's package; `make setup` installs it) driven by Playwright:
# the playground page and the HTML report are checked in it.
CHROMIUM = os.environ.get("SOFTPROMPT_CHROMIUM") or shutil.which("chromium") or \
    shutil.which("chromium-browser")
@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.fail("no chromium found: run `make setup` (apt-get install -y chromium) or set "
                    "SOFTPROMPT_CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chrome
        finally:
            chrome.close()
