"""Beam search behind a cached prefix, batched: B inputs x K beams decoded in one batch.

Transformers' beam search (``GenerationMixin._beam_search`` with its defaults:
``length_penalty=1.0``, ``early_stopping=False``) on our cache. The ``[BOS? | P]`` prefix's
keys/values are computed once (inputs.PromptCache), each input is prefilled once and its cache
row copied to its K beams (row ``b * K + j``). Then, at each step and for each input:

1. each beam's next-token log-probabilities (float32), with the decoding controls applied
   (softprompt.decoding, to log-probabilities as transformers does), plus the beam's running
   score: ``K x V`` candidates, of which the best ``2K`` are kept (so that K stay alive even
   if K of them end);
2. a candidate ends on EOS, on a stop string (see generation.hits_stop), or at
   ``max_new_tokens``; one that ends and ranks in the top K joins the input's finished
   hypotheses with the score ``sum(log p) / new_tokens ** length_penalty`` (EOS counted), and
   the best K finished hypotheses are kept;
3. the best K candidates that did not end continue: the cache rows follow their beams.

An input is done once it holds K finished hypotheses and its best running beam, scored at the
current length, cannot beat the worst of them (transformers' heuristic for
``early_stopping=False``); done inputs leave the batch. The output of an input is its best
finished hypothesis, EOS dropped. tests/test_decoding.py compares every output with
transformers' ``generate(num_beams=K)`` on the same inputs embedded by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from softprompt.decoding import DecodingControls, apply_controls, controls_active
from softprompt.generation import hits_stop, input_history, prefill
from softprompt.inputs import PromptCache, cached_forward, select_rows


class BeamSettings(DecodingControls, Protocol):
    """What beam search reads (GenerationConfig, or a serving request's SamplingParams)."""

    num_beams: int
    max_new_tokens: int


LENGTH_PENALTY = 1.0  # transformers' default: the score is the mean log-probability
NEG = -1.0e9  # transformers' "never chosen" score offset


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, N, ...]`` gathered along dim 1 with ``index`` ``[B, M]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(model, tokenizer, prefix: PromptCache | None, encoded: list[list[int]],
                cfg: BeamSettings, stop: str | Sequence[str] | None = None,
                bos: int | None = None) -> list[list[int]]:
    """The best hypothesis of ``cfg.num_beams``-beam search for each input (new ids, no EOS).

    Args:
        prefix: the ``[BOS? | P]`` cache (None: nothing before the inputs).
        encoded: each input's ids without BOS (it lives in ``prefix``; ``bos`` names it so
            that the decoding controls weigh it, as transformers does).
        cfg: ``num_beams``, ``max_new_tokens`` and the decoding controls.
        stop: stop string(s) that end a hypothesis like EOS.
    """
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
    k, max_new = cfg.num_beams, cfg.max_new_tokens
    device = model.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    logits, cache, full_mask, next_pos = prefill(model, prefix, encoded, pad, max_new)
    # 0. Every input's row (cache, mask, position) copied to its K beams: row b * K + j.
    rows = torch.arange(len(encoded), device=device).repeat_interleave(k)  # [B * K]
    cache = select_rows(cache, rows)
    logits, full_mask, next_pos = logits[rows], full_mask[rows], next_pos[rows]
    controlled = controls_active(cfg)
    history = input_history(encoded, bos, device, cfg)[rows] if controlled else None

    items = list(range(len(encoded)))  # the inputs still in the batch, in batch order
    bsz, keep = len(items), 2 * k
    top_k = torch.arange(keep, device=device) < k  # [2K]: candidates that may finish
    running = torch.full((bsz, k, max_new), pad, dtype=torch.long, device=device)  # new ids
    running_scores = torch.zeros(bsz, k, device=device)  # [B, K] sum of log-probs
    running_scores[:, 1:] = NEG  # all beams start equal: only beam 0's candidates count
    done = running.clone()  # [B, K, max_new] finished hypotheses,
    done_scores = torch.full((bsz, k), NEG, device=device)  # their scores,
    done_len = torch.zeros(bsz, k, dtype=torch.long, device=device)  # their lengths
    finished = torch.zeros(bsz, k, dtype=torch.bool, device=device)  # slot holds one
    improvable = torch.ones(bsz, 1, dtype=torch.bool, device=device)  # [B, 1]
    best: dict[int, list[int]] = {}

    for step in range(max_new):
        # 1. Candidates: K x V per input, the best 2K kept.
        log_probs = torch.log_softmax(logits.float(), -1)  # [B * K, V]
        if controlled:
            log_probs = apply_controls(log_probs, history, step, cfg, eos)
        vocab = log_probs.shape[-1]
        totals = log_probs.view(bsz, k, vocab) + running_scores.unsqueeze(-1)
        cand_scores, cand_index = totals.view(bsz, k * vocab).topk(keep)  # [B, 2K]
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand = _take(running, cand_beam).clone()  # [B, 2K, max_new]
        cand[:, :, step] = cand_token
        # 2. Which candidates end.
        ends = torch.zeros_like(cand_token, dtype=torch.bool)
        if eos is not None:
            ends |= cand_token == eos
        if step + 1 >= max_new:
            ends[:] = True
        elif stops:
            seqs = cand[:, :, :step + 1].tolist()
            for b in range(bsz):
                for j in range(keep):
                    if not ends[b, j] and any(hits_stop(tokenizer, seqs[b][j], s)
                                              for s in stops):
                        ends[b, j] = True
        # 3. The best K that go on.
        alive_scores = cand_scores + ends.float() * NEG
        chosen = alive_scores.topk(k).indices  # [B, K]
        running = _take(cand, chosen)
        running_scores = _take(alive_scores, chosen)
        source = _take(cand_beam, chosen)  # [B, K] the beam each one extends
        # 4. Finished hypotheses: the best K of the kept ones and those just ended.
        just = ends & top_k
        final = cand_scores / ((step + 1) ** LENGTH_PENALTY)
        final = final + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.cat([done_scores, final], 1).topk(k).indices  # [B, K]
        done = _take(torch.cat([done, cand], 1), merged)
        done_scores = _take(torch.cat([done_scores, final], 1), merged)
        new_len = torch.full_like(cand_token, step + 1)
        done_len = _take(torch.cat([done_len, new_len], 1), merged)
        finished = _take(torch.cat([finished, just], 1), merged)
        # 5. Can an input's running beams still beat its finished ones?
        best_running = running_scores[:, :1] / ((step + 1) ** LENGTH_PENALTY)
        worst = torch.where(finished, done_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        if step + 1 >= max_new or bool(ends.all()):
            break
        # 6. Done inputs leave the batch; the rest follow their beams' cache rows.
        alive = improvable.squeeze(1)
        if not bool(alive.all()):
            for b in (~alive).nonzero().flatten().tolist():
                best[items[b]] = done[b, 0, :done_len[b, 0]].tolist()
            if not bool(alive.any()):
                break
            idx = alive.nonzero().flatten()
            items = [items[b] for b in idx.tolist()]
            running, running_scores, source = running[idx], running_scores[idx], source[idx]
            done, done_scores, done_len = done[idx], done_scores[idx], done_len[idx]
            finished, improvable = finished[idx], improvable[idx]
            old_rows = (idx.unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
            full_mask, next_pos = full_mask[old_rows], next_pos[old_rows]
            bsz = len(items)
        else:
            old_rows = torch.arange(bsz * k, device=device)
        # Row b * K + j continues old row (input b's) * K + source[b, j].
        rows = (old_rows.view(bsz, k)[:, :1] + source).flatten()  # [B * K]
        cache = select_rows(cache, rows)
        tokens = running[:, :, step].flatten()  # [B * K]
        if controlled:
            history = torch.cat([history[rows], tokens.unsqueeze(1)], 1)
        full_mask = torch.cat([full_mask, full_mask.new_ones(bsz * k, 1)], 1)
        logits, cache = cached_forward(model, cache, tokens.unsqueeze(1), full_mask, next_pos)
        next_pos = next_pos + 1

    for b, item in enumerate(items):
        best[item] = done[b, 0, :done_len[b, 0]].tolist()
    return [best[i][:-1] if best[i] and best[i][-1] == eos else best[i]
            for i in range(len(encoded))]
