"""Decoding controls on next-token scores, with transformers' semantics.

Three controls, each a pure function of a batch's scores ``[N, V]`` and the rows' histories
``[N, L]`` (token ids, left-padded with :data:`NO_TOKEN`):

* ``repetition_penalty`` (transformers' RepetitionPenaltyLogitsProcessor, CTRL's penalty):
  every token id already in the row has its score divided by the penalty where positive,
  multiplied where negative (at most once per id, however often it occurs);
* ``no_repeat_ngram_size`` (NoRepeatNGramLogitsProcessor): a token that would complete an
  n-gram already in the row gets ``-inf``;
* ``min_new_tokens`` (MinNewTokensLengthLogitsProcessor): EOS gets ``-inf`` until the row has
  that many new tokens. Stop strings still end a row (transformers' StopStringCriteria is not
  held back either).

**Which tokens a row's history holds.** As in transformers for a decoder-only model, and in
PEFT's ``generate`` behind a soft prompt: the input's token ids (BOS included where the
tokenizer adds one) and every generated token; never the soft prompt's virtual tokens (they
have no ids), never padding. So a penalty also weighs tokens that the input holds: a summary
or an extractive answer that copies its input is penalised for it (vLLM's ``repetition_penalty``
counts the input too). ``penalize_output_only`` leaves the input out: the history is the
generated tokens alone (what transformers does for an encoder-decoder model's decoder, where
``no_repeat_ngram_size=3`` is the classic summarisation setting, and for a decoder-only model
given ``inputs_embeds`` without ``input_ids``). tests/test_decoding.py compares each control,
both ways, with transformers' ``generate`` on the same inputs.

Greedy decoding and sampling apply the controls to the logits (before temperature and top-p);
beam search to the log-probabilities (transformers does both the same way).
"""

from __future__ import annotations

from typing import Protocol

import torch

NO_TOKEN = -1  # a history slot that holds no token (left padding)


class DecodingControls(Protocol):
    """The controls' settings (GenerationConfig, or a serving request's SamplingParams)."""

    repetition_penalty: float  # 1.0: off
    no_repeat_ngram_size: int  # 0: off
    min_new_tokens: int  # 0: off
    penalize_output_only: bool  # the two above weigh the generated tokens alone


def controls_active(settings: DecodingControls) -> bool:
    """Does any control change scores (so decoding must keep the rows' histories)?"""
    return (settings.repetition_penalty != 1.0 or settings.no_repeat_ngram_size > 0
            or settings.min_new_tokens > 0)


def history_tensor(rows: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N, L]`` token ids of each row, left-padded with :data:`NO_TOKEN` to the longest."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), NO_TOKEN, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row)
    return out.to(device)


def penalize_repeats(scores: torch.Tensor, history: torch.Tensor,
                     penalty: float) -> torch.Tensor:
    """``[N, V]`` scores with each id in the row's ``history`` ``[N, L]`` penalised once."""
    vocab = scores.shape[-1]
    # NO_TOKEN (and any id past the scores) goes to a spare column that is dropped after.
    ids = history.masked_fill(history < 0, vocab).clamp(max=vocab)  # [N, L]
    padded = torch.nn.functional.pad(scores, (0, 1))  # [N, V + 1]
    picked = padded.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """``-inf`` for every token that would repeat an ``n``-gram of the row's ``history``.

    The row's last ``n - 1`` tokens are matched against every window of ``n`` tokens; a
    matching window bans its last token. Windows that reach into padding match nothing.
    """
    length = history.shape[1]
    if length < n:
        return scores
    vocab = scores.shape[-1]
    suffix = history[:, length + 1 - n:]  # [N, n - 1]
    windows = history.unfold(1, n, 1)  # [N, L - n + 1, n]
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(-1) & (windows >= 0).all(-1)
    matches &= (suffix >= 0).all(-1, keepdim=True)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def forbid_eos(scores: torch.Tensor, new_tokens: int, min_new_tokens: int,
               eos: int | None) -> torch.Tensor:
    """``-inf`` on EOS while the rows (all with ``new_tokens`` new tokens: a batch decodes in
    step) have fewer than ``min_new_tokens``."""
    if eos is None or new_tokens >= min_new_tokens:
        return scores
    scores = scores.clone()
    scores[:, eos] = float("-inf")
    return scores


def apply_controls(scores: torch.Tensor, history: torch.Tensor | None,
                   new_tokens: int, settings: DecodingControls,
                   eos: int | None) -> torch.Tensor:
    """Every active control, in transformers' order, on float32 ``[N, V]`` scores.

    ``history`` ``[N, L]``: each row's input ids and generated ids (None: no control that
    reads it is active); ``new_tokens``: the rows' count of generated tokens (the same for
    all: greedy, sampled and beam rows all decode in step).
    """
    scores = scores.float()
    if settings.repetition_penalty != 1.0:
        assert history is not None
        scores = penalize_repeats(scores, history, settings.repetition_penalty)
    if settings.no_repeat_ngram_size > 0:
        assert history is not None
        scores = ban_repeated_ngrams(scores, history, settings.no_repeat_ngram_size)
    return forbid_eos(scores, new_tokens, settings.min_new_tokens, eos)
