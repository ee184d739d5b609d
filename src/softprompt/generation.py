"""Batched decoding behind a soft prompt, with the prompt's key/value cache reused.

The ``[BOS? | P]`` prefix does not depend on the input, so its keys/values are computed once
per prompt and copied into every batch (inputs.PromptCache), whose cache reserves room for all
the positions it will reach (no per-step copies). Rows are sorted by length,
decoded greedily (or sampled), and each stops at EOS or at the task's stop string; a stop
string only counts once the row has produced non-whitespace text.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from softprompt.batching import length_sorted_batches
from softprompt.config import GenerationConfig
from softprompt.encode import adds_bos
from softprompt.errors import SoftPromptError
from softprompt.inputs import (
    build_prompt_cache,
    cached_forward,
    first_positions,
    full_logits,
    prompted_batch,
    reserved_cache,
    select_rows,
)


def cut_at_stop(text: str, stop: str | None) -> tuple[str, bool]:
    """Cut ``text`` at the first ``stop`` after its leading whitespace; return (text, stopped)."""
    body = text.lstrip()
    if stop:
        at = body.find(stop)
        if at >= 0:
            return body[:at].strip(), True
    return body.strip(), False


def _next_tokens(logits: torch.Tensor, cfg: GenerationConfig,
                 gen: torch.Generator | None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` next tokens (greedy, or temperature/top-p sampling)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, -1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the smallest top set
        sorted_probs = sorted_probs.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str] | list[list[int]],
             prompt: torch.Tensor | None = None,
             config: GenerationConfig | None = None, stop: str | None = None,
             progress: bool = False) -> list[str]:
    """Generate a continuation for each input text behind the soft prompt.

    Args:
        model, tokenizer: frozen model and tokenizer.
        texts: input texts (already rendered with the task template), or their token ids
            (as the tokenizer gives them, BOS included where it adds one).
        prompt: ``[P, H]`` soft prompt, or None for the plain model (hard prompts).
        config: decoding settings.
        stop: stop string (besides EOS), e.g. ``"\\n"``.

    Returns:
        One string per input, in input order, cut at the stop string and stripped.
    """
    cfg = config or GenerationConfig()
    device = model.device
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    encoded = [tokenizer(t).input_ids if isinstance(t, str) else list(t) for t in texts]
    if bos is not None:  # BOS moves into the cached prefix, before the prompt
        encoded = [ids[1:] if ids and ids[0] == bos else ids for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise SoftPromptError(f"input {i + 1} is empty; give some text to continue")
    prefix = build_prompt_cache(model, prompt, bos)
    prefix_len = prefix.length if prefix is not None else 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
    results: list[str] = [""] * len(texts)
    batches = length_sorted_batches([len(ids) for ids in encoded], cfg.batch_size)
    bar = tqdm(total=len(texts), disable=not progress, desc="generate", unit="ex")
    for rows in batches:
        bsz = len(rows)
        width = max(len(encoded[r]) for r in rows)
        input_ids = torch.full((bsz, width), pad, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids = encoded[r]
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = first_positions(prefix_len, mask)  # [B, T]
        full_mask = torch.cat([mask.new_ones(bsz, prefix_len), mask], 1)  # [B, C + T]
        # Room for every position this batch can reach: no cache copies while decoding.
        capacity = prefix_len + width + cfg.max_new_tokens
        cache = reserved_cache(capacity, prefix, bsz)
        logits, cache = cached_forward(model, cache, input_ids, full_mask, positions)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        generated: list[list[int]] = [[] for _ in rows]
        active = list(range(bsz))  # batch rows still decoding; logits has one row for each
        for step in range(cfg.max_new_tokens):
            tokens = _next_tokens(logits, cfg, gen)  # [A]
            keep = []
            for j, tok in enumerate(tokens.tolist()):
                i = active[j]
                if tok == eos:
                    continue
                generated[i].append(tok)
                if stop and stop in tokenizer.decode([tok]) and cut_at_stop(
                        tokenizer.decode(generated[i]), stop)[1]:
                    continue
                keep.append(j)
            if not keep or step == cfg.max_new_tokens - 1:  # no forward whose logits go unread
                break
            if len(keep) < len(active):  # finished rows leave the batch: no compute on them
                index = torch.tensor(keep, device=device)
                cache = select_rows(cache, index)
                tokens, full_mask, next_pos = tokens[index], full_mask[index], next_pos[index]
                active = [active[j] for j in keep]
            full_mask = torch.cat([full_mask, full_mask.new_ones(len(active), 1)], 1)
            logits, cache = cached_forward(model, cache, tokens.unsqueeze(1), full_mask, next_pos)
            next_pos = next_pos + 1
        for i, r in enumerate(rows):
            results[r] = cut_at_stop(tokenizer.decode(generated[i], skip_special_tokens=True),
                                     stop)[0]
        bar.update(bsz)
    bar.close()
    return results


@torch.no_grad()
def generate_reference(model, tokenizer, text: str, prompt: torch.Tensor | None,
                       max_new_tokens: int) -> list[int]:
    """Greedy token ids for one input with no cache at all: the whole prompted sequence is
    re-run every step. Slow; the parity tests compare :func:`generate` against it."""
    ids = tokenizer(text).input_ids
    bos_offset = int(adds_bos(tokenizer))
    out: list[int] = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([ids + out], device=model.device)
        mask = torch.ones_like(input_ids)
        if prompt is None:
            prompt = model.get_input_embeddings().weight.new_zeros(0, model.config.hidden_size)
        batch = prompted_batch(model, prompt, input_ids, mask, bos_offset=bos_offset)
        tok = int(full_logits(model, batch)[0, -1].argmax())
        if tok == tokenizer.eos_token_id:
            break
        out.append(tok)
    return out
