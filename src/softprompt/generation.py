"""Batched decoding behind a soft prompt, with the prompt's key/value cache reused.

The ``[BOS? | P]`` prefix does not depend on the input, so its keys/values are computed once
per prompt and copied into every batch (inputs.PromptCache), whose cache reserves room for all
the positions it will reach (no per-step copies). Rows are sorted by length,
decoded greedily (or sampled, or by beam search: softprompt.beam_search), with the decoding
controls of softprompt.decoding (repetition penalty, no-repeat n-grams, minimum new tokens)
applied per row, and each stops at EOS or at the task's stop string (which may
span tokens); a stop string only counts once the row has produced non-whitespace text. An
input must leave room in the model's positions for the prompt and the new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from softprompt.batching import length_sorted_batches
from softprompt.config import GenerationConfig
from softprompt.decoding import (
    DecodingControls,
    apply_controls,
    controls_active,
    history_tensor,
)
from softprompt.encode import adds_bos, context_limit
from softprompt.errors import SoftPromptError
from softprompt.inputs import (
    PromptCache,
    build_prompt_cache,
    cached_forward,
    empty_prompt,
    first_positions,
    full_logits,
    prompted_batch,
    reserved_cache,
    select_rows,
)
from softprompt.prefix import PromptLike, num_virtual_tokens


class SamplingSettings(Protocol):
    """What choosing a next token reads (GenerationConfig, or a serving request's settings)."""

    temperature: float  # 0: greedy
    top_p: float


def cut_at_stop(text: str, stop: str | Sequence[str] | None) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string (one, or any of several) after its leading
    whitespace; return (text, stopped)."""
    body = text.lstrip()
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
    found = [at for at in (body.find(s) for s in stops if s) if at >= 0]
    if found:
        return body[:min(found)].strip(), True
    return body.strip(), False


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig | SamplingSettings,
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
             prompt: PromptLike | None = None,
             config: GenerationConfig | None = None, stop: str | None = None,
             progress: bool = False) -> list[str]:
    """Generate a continuation for each input text behind the soft prompt.

    Args:
        model, tokenizer: frozen model and tokenizer.
        texts: input texts (already rendered with the task template), or their token ids
            (as the tokenizer gives them, BOS included where it adds one). Each must leave room
            in the model's positions for the prompt and ``max_new_tokens`` (callers cut inputs
            to fit with ``encode.encode_example``); one that does not is refused.
        prompt: ``[P, H]`` soft prompt or a :class:`~softprompt.prefix.KVPrefix` (compiled to
            one key/value cache for all rows), or None for the plain model (hard prompts).
        config: decoding settings (greedy, sampling or beam search, and the decoding controls).
        stop: stop string (besides EOS), e.g. ``"\\n"``.

    Returns:
        One string per input, in input order, cut at the stop string and stripped.
    """
    generated = generate_ids(model, tokenizer, texts, prompt, config, stop, progress)
    return [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0]
            for ids in generated]


@torch.no_grad()
def generate_ids(model, tokenizer, texts: list[str] | list[list[int]],
                 prompt: PromptLike | None = None,
                 config: GenerationConfig | None = None, stop: str | None = None,
                 progress: bool = False) -> list[list[int]]:
    """:func:`generate`'s new token ids for each input, EOS dropped, before decoding."""
    cfg = config or GenerationConfig()
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    encoded = [tokenizer(t).input_ids if isinstance(t, str) else list(t) for t in texts]
    if bos is not None:  # BOS moves into the cached prefix, before the prompt
        encoded = [ids[1:] if ids and ids[0] == bos else ids for ids in encoded]
    check_inputs(encoded, num_virtual_tokens(prompt), cfg.max_new_tokens,
                 context_limit(model), bos is not None)
    prefix = build_prompt_cache(model, prompt, bos)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
    results: list[list[int]] = [[] for _ in texts]
    bar = tqdm(total=len(texts), disable=not progress, desc="generate", unit="ex")
    for rows in length_sorted_batches([len(ids) for ids in encoded], cfg.batch_size):
        batch = [encoded[r] for r in rows]
        if cfg.num_beams > 1:
            from softprompt.beam_search import beam_search

            generated = beam_search(model, tokenizer, prefix, batch, cfg, stop, bos)
        else:
            generated = _generate_batch(model, tokenizer, prefix, batch, cfg, stop, gen, bos)
        for r, ids in zip(rows, generated):
            results[r] = ids
        bar.update(len(rows))
    bar.close()
    return results


def check_inputs(encoded: list[list[int]], num_virtual: int, max_new_tokens: int,
                 limit: int | None, bos: bool = False) -> None:
    """Refuse an empty input, or one that with the prompt's ``P`` and ``max_new_tokens`` needs
    more positions than the model has (``limit``; None: no limit known).

    ``encoded`` holds each input's ids without BOS; ``bos``: the prefix carries one.
    """
    for i, ids in enumerate(encoded):
        if not ids:
            raise SoftPromptError(f"input {i + 1} is empty; give some text to continue")
        length = len(ids) + bos  # as the tokenizer counts it
        need = num_virtual + length + max_new_tokens
        if limit is not None and need > limit:
            raise SoftPromptError(
                f"input {i + 1} is {length} tokens; with the {num_virtual}-token prompt and "
                f"max_new_tokens={max_new_tokens} it needs {need} positions but the model has "
                f"{limit}; shorten the input (a task's truncate field is cut to fit "
                f"--max-length) or lower --max-new-tokens")


def prefill(model, prefix: PromptCache | None, encoded: list[list[int]], pad: int,
            capacity: int):
    """One forward of left-padded input ids ``encoded`` (BOS already in ``prefix``) on top of
    the prefix, in a cache reserving ``capacity`` positions beyond the batch's inputs.

    Returns ``(last logits [B, V], cache, full_mask [B, C + T], next_pos [B, 1])``.
    """
    device = model.device
    prefix_len = prefix.length if prefix is not None else 0
    bsz, width = len(encoded), max(len(ids) for ids in encoded)
    input_ids = torch.full((bsz, width), pad, dtype=torch.long)  # [B, T], left-padded
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = first_positions(prefix_len, mask)  # [B, T]
    full_mask = torch.cat([mask.new_ones(bsz, prefix_len), mask], 1)  # [B, C + T]
    # Room for every position this batch can reach: no cache copies while decoding.
    cache = reserved_cache(prefix_len + width + capacity, prefix, bsz)
    logits, cache = cached_forward(model, cache, input_ids, full_mask, positions)
    return logits, cache, full_mask, positions[:, -1:] + 1


def input_history(encoded: list[list[int]], bos: int | None, device: torch.device | str,
                  settings: DecodingControls) -> torch.Tensor:
    """``[B, L]`` the input ids the decoding controls weigh for each row: BOS (where the
    prefix carries one) and the input's ids, left-padded with ``decoding.NO_TOKEN``; none
    (``[B, 0]``) with ``penalize_output_only``."""
    if settings.penalize_output_only:
        return torch.empty(len(encoded), 0, dtype=torch.long, device=device)
    lead = [] if bos is None else [bos]
    return history_tensor([lead + list(ids) for ids in encoded], device)


def _generate_batch(model, tokenizer, prefix: PromptCache | None, encoded: list[list[int]],
                    cfg: GenerationConfig, stop: str | None,
                    gen: torch.Generator | None, bos: int | None = None) -> list[list[int]]:
    """Decode one batch of input ids (BOS already in ``prefix``); the new ids of each row."""
    device = model.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    logits, cache, full_mask, next_pos = prefill(model, prefix, encoded, pad,
                                                 cfg.max_new_tokens)
    controlled = controls_active(cfg)
    # [A, L + step]: what the controls weigh (only kept when one is on)
    history = input_history(encoded, bos, device, cfg) if controlled else None
    generated: list[list[int]] = [[] for _ in encoded]
    active = list(range(len(encoded)))  # batch rows still decoding; logits has one row each
    for step in range(cfg.max_new_tokens):
        if controlled:
            logits = apply_controls(logits, history, step, cfg, eos)
        tokens = next_tokens(logits, cfg, gen)  # [A]
        keep = []
        for j, tok in enumerate(tokens.tolist()):
            i = active[j]
            if tok == eos:
                continue
            generated[i].append(tok)
            if not (stop and hits_stop(tokenizer, generated[i], stop)):
                keep.append(j)
        if not keep or step == cfg.max_new_tokens - 1:  # no forward whose logits go unread
            break
        if controlled:
            history = torch.cat([history, tokens.unsqueeze(1)], 1)
        if len(keep) < len(active):  # finished rows leave the batch: no compute on them
            index = torch.tensor(keep, device=device)
            cache = select_rows(cache, index)
            tokens, full_mask, next_pos = tokens[index], full_mask[index], next_pos[index]
            history = history[index] if controlled else None
            active = [active[j] for j in keep]
        full_mask = torch.cat([full_mask, full_mask.new_ones(len(active), 1)], 1)
        logits, cache = cached_forward(model, cache, tokens.unsqueeze(1), full_mask, next_pos)
        next_pos = next_pos + 1
    return generated


def hits_stop(tokenizer, ids: list[int], stop: str) -> bool:
    """Does the output ``ids`` hold ``stop`` after its leading whitespace (see
    :func:`cut_at_stop`), now that its newest token is in?

    A stop string may span several tokens (``"\\n\\n"``, ``"###"``), so the newest token alone
    is not enough. Each step decodes only the trailing tokens that could hold a new occurrence:
    one per byte of ``stop`` (every token carries at least one byte) plus one, for decoders
    that drop a leading space. Only when that tail holds ``stop`` is the whole output decoded,
    to apply the leading-whitespace rule.
    """
    window = len(stop.encode("utf-8")) + 1
    if stop not in tokenizer.decode(ids[-window:], skip_special_tokens=True):
        return False
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[1]


@torch.no_grad()
def generate_reference(model, tokenizer, text: str, prompt: PromptLike | None,
                       max_new_tokens: int) -> list[int]:
    """Greedy token ids for one input with no cache at all: the whole prompted sequence is
    re-run every step. Slow; the parity tests compare :func:`generate` against it."""
    ids = tokenizer(text).input_ids
    bos_offset = int(adds_bos(tokenizer))
    prompt = empty_prompt(model) if prompt is None else prompt
    out: list[int] = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([ids + out], device=model.device)
        mask = torch.ones_like(input_ids)
        batch = prompted_batch(model, prompt, input_ids, mask, bos_offset=bos_offset)
        tok = int(full_logits(model, batch)[0, -1].argmax())
        if tok == tokenizer.eos_token_id:
            break
        out.append(tok)
    return out
