"""The one place where the soft prompt meets the model's inputs.

Everything that merges a ``[P, H]`` prompt into a batch lives here: embeddings, attention
mask, position ids, labels, the loss on target tokens, and the prompt's key/value cache.
Transformers' cache API changes touch only this module.

Four layouts, equivalent up to float rounding (tests/test_inputs.py and tests/test_engine.py
prove it):

* reference layout, per row ``[pad.. | BOS? | P prompt | tokens..]``: the prompt sits
  immediately before the first real token (after BOS where the tokenizer adds one); used by
  the uncached generation reference the parity tests compare against;
* training layout, per row ``[BOS? | P prompt | tokens.. | pad..]`` (right padding): every
  real token sits at the same position as in the reference layout and pads come after all of
  them, so causal attention alone keeps pads out of sight and no attention mask is passed.
  The model's attention then takes its mask-free causal kernel (measured ~4% faster per step
  than an explicit padding mask);
* cached layout for generation, ``[BOS? | P prompt]`` (computed once, shared by every row)
  followed by the left-padded tokens ``[pad.. | tokens..]``, in a KV cache reserved up front
  for every position the batch will reach;
* mixed-prefix layout for the serving engine, per row ``[masked | prefix_r | masked |
  tokens_r..]``: rows behind different prompts share one cache, right-aligned, each row's
  prefix at positions ``0..C_r-1`` and its tokens from ``C_r`` on (``fill_prefixes``,
  ``concat_rows``, ``drop_leading_slots``).

A KV prefix (prefix tuning, :class:`softprompt.prefix.KVPrefix`) takes no input positions: it
is the first ``P`` slots of the cache in every layout, the tokens after it (BOS first) count
positions from ``P``. The training layout passes it as a differentiable past cache
(:func:`prefix_cache`); :func:`build_prompt_cache` compiles a prompt of either kind to the
same :class:`PromptCache`, so generation and the engine never ask which kind they hold.

Position ids always come from the attention mask (or, with right padding, count from 0), so
pads never shift positions (GPT-2 has learned absolute positions; RoPE models see the same
relative offsets).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from softprompt.batching import collate
from softprompt.encode import IGNORE_INDEX
from softprompt.prefix import KVPrefix, PromptLike, check_fits, kv_shape
from softprompt.prompt import check_hidden_size

__all__ = ["IGNORE_INDEX", "PromptedBatch", "PromptCache", "empty_prompt", "insert_prompt",
           "prompted_batch", "right_padded_batch", "plain_head", "target_loss", "rows_loss",
           "full_logits", "build_prompt_cache", "reserved_cache", "cached_forward", "select_rows",
           "left_pad_mask", "fill_prefixes", "concat_rows", "drop_leading_slots", "prefix_cache",
           "tokens_kv"]


@dataclass
class PromptedBatch:
    """Model inputs with the prompt merged in. ``L = P + T``."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor | None  # [B, L]; None: causal only (pads, if any, at the end)
    position_ids: torch.Tensor | None  # [B, L]; None: 0, 1, ..., L - 1
    labels: torch.Tensor | None  # [B, L], IGNORE_INDEX on pads, prompt and input
    cache: DynamicCache | None = None  # a KV prefix's [B, kv, P, d] per layer, else None


def positions_from_mask(attention_mask: torch.Tensor,
                        offset: int | torch.Tensor = 0) -> torch.Tensor:
    """``[B, L]`` mask -> ``[B, L]`` position ids: 0, 1, ... over real tokens, pads get 0."""
    positions = attention_mask.long().cumsum(-1) - 1 + offset
    return positions.clamp(min=0).masked_fill(attention_mask == 0, 0)


def empty_prompt(model: PreTrainedModel) -> torch.Tensor:
    """``[0, H]``: no prompt at all, in the dtype and on the device of the model's embeddings
    (the plain model, hard prompts, and a BOS-only prefix go through the prompted paths)."""
    weight = model.get_input_embeddings().weight
    return weight.new_zeros(0, weight.shape[1])


def insert_prompt(token_embeds: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor,
                  labels: torch.Tensor | None = None, bos_offset: int = 0) -> PromptedBatch:
    """Splice the prompt into each left-padded row just before its first real token.

    Args:
        token_embeds: ``[B, T, H]`` embeddings of left-padded input ids.
        attention_mask: ``[B, T]``, 0 on pads.
        prompt: ``[P, H]`` soft prompt (any float dtype; cast to ``token_embeds.dtype``).
        labels: ``[B, T]`` or None.
        bos_offset: 1 if each row starts with a BOS token that must stay in front of the prompt.

    Returns:
        A :class:`PromptedBatch` of length ``P + T``.
    """
    bsz, seq_len, hidden = token_embeds.shape
    check_hidden_size(prompt, hidden)
    num_virtual = prompt.shape[0]
    device = token_embeds.device
    # First real token of each row (left padding), then where the prompt goes.
    first = attention_mask.long().argmax(dim=-1)  # [B]
    insert_at = (first + bos_offset).unsqueeze(1)  # [B, 1]
    j = torch.arange(seq_len + num_virtual, device=device).unsqueeze(0)  # [1, P + T]
    # Index into cat([tokens, prompt]) ([B, T + P]) for each output position.
    index = torch.where(j < insert_at, j,
                        torch.where(j < insert_at + num_virtual, seq_len + j - insert_at,
                                    j - num_virtual))  # [B, P + T]
    combined = torch.cat([token_embeds, prompt.to(token_embeds.dtype).expand(bsz, -1, -1)], 1)
    embeds = combined.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden))  # [B, P + T, H]
    ones = attention_mask.new_ones(bsz, num_virtual)
    mask = torch.cat([attention_mask, ones], 1).gather(1, index)  # [B, P + T]
    merged_labels = None
    if labels is not None:
        ignore = labels.new_full((bsz, num_virtual), IGNORE_INDEX)
        merged_labels = torch.cat([labels, ignore], 1).gather(1, index)
    return PromptedBatch(embeds, mask, positions_from_mask(mask), merged_labels)


def right_padded_batch(model: PreTrainedModel, prompt: PromptLike, input_ids: torch.Tensor,
                       labels: torch.Tensor, bos_offset: int = 0) -> PromptedBatch:
    """The training layout: ``[BOS? | P | tokens.. | pad..]`` per row, no attention mask.

    Args:
        prompt: ``[P, H]`` soft prompt, or a :class:`KVPrefix` (then each row is
            ``[BOS? | tokens.. | pad..]`` behind the prefix's ``P`` cache slots, from position
            ``P`` on).
        input_ids, labels: ``[B, T]``, **right**-padded (labels IGNORE_INDEX on pads).
        bos_offset: 1 if each row starts with a BOS token that stays in front of the prompt.

    Returns:
        A :class:`PromptedBatch` of length ``P + T`` (``T`` for a KV prefix) with
        ``attention_mask`` None. Each real token has the position it has in
        :func:`prompted_batch`'s layout and attends to the same tokens (all of them come before
        any pad), so logits at real tokens, the loss and the prompt's gradient are the same.
    """
    token_embeds = embed(model, input_ids)  # [B, T, H]
    bsz, seq_len = input_ids.shape
    if isinstance(prompt, KVPrefix):
        p = prompt.num_virtual_tokens
        positions = torch.arange(p, p + seq_len, device=input_ids.device).expand(bsz, -1)
        return PromptedBatch(token_embeds, None, positions, labels,
                             prefix_cache(model, prompt, bsz))
    check_hidden_size(prompt, token_embeds.shape[-1])
    num_virtual = prompt.shape[0]
    soft = prompt.to(token_embeds.dtype).expand(bsz, -1, -1)  # [B, P, H]
    embeds = torch.cat([token_embeds[:, :bos_offset], soft, token_embeds[:, bos_offset:]], 1)
    ignore = labels.new_full((bsz, num_virtual), IGNORE_INDEX)
    merged_labels = torch.cat([labels[:, :bos_offset], ignore, labels[:, bos_offset:]], 1)
    return PromptedBatch(embeds, None, None, merged_labels)


def prefix_cache(model: PreTrainedModel, prefix: KVPrefix, batch_size: int) -> DynamicCache:
    """A fresh ``DynamicCache`` holding ``prefix`` for ``batch_size`` rows, in the model's dtype
    (``[B, kv_heads, P, head_dim]`` per layer). Differentiable: gradients reach ``prefix.kv``.
    A forward appends to it, so every forward takes a new one."""
    check_fits(prefix, model)
    weight = model.get_input_embeddings().weight
    return DynamicCache([(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                         for k, v in prefix.layers(weight.dtype, weight.device)])


def embed(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` ids -> ``[B, T, H]`` input embeddings of the frozen model."""
    return model.get_input_embeddings()(input_ids)


def prompted_batch(model: PreTrainedModel, prompt: PromptLike, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                   bos_offset: int = 0) -> PromptedBatch:
    """The reference layout of left-padded ``input_ids`` ``[B, T]`` behind ``prompt``.

    A ``[P, H]`` prompt is spliced in before each row's first real token (after BOS):
    ``[B, P + T]``. A :class:`KVPrefix` goes into the cache in front of every row: the batch
    stays ``[B, T]``, its mask is ``[B, P + T]`` and real tokens take positions ``P, P + 1, ..``.
    """
    if not isinstance(prompt, KVPrefix):
        return insert_prompt(embed(model, input_ids), attention_mask, prompt, labels, bos_offset)
    p, bsz = prompt.num_virtual_tokens, input_ids.shape[0]
    mask = torch.cat([attention_mask.new_ones(bsz, p), attention_mask], 1)  # [B, P + T]
    positions = (positions_from_mask(attention_mask) + p).masked_fill(attention_mask == 0, 0)
    return PromptedBatch(embed(model, input_ids), mask, positions, labels,
                         prefix_cache(model, prompt, bsz))


_PLAIN_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> bool


def plain_head(model: PreTrainedModel) -> bool:
    """Are the model's logits exactly ``lm_head(base_model(...)[0])``? Checked once per model.

    :func:`target_loss` projects only the hidden states that predict targets, which is right
    only where the forward adds nothing after the output embeddings (no logit scaling or
    soft-capping, whatever the config calls it). So both ways run on one short row, and where
    they disagree the loss takes the full logits.
    """
    if model not in _PLAIN_HEAD:
        _PLAIN_HEAD[model] = _probe_plain_head(model)
    return _PLAIN_HEAD[model]


@torch.no_grad()
def _probe_plain_head(model: PreTrainedModel) -> bool:
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if model.base_model is model or head is None:
        return False
    ids = torch.arange(8, device=table.weight.device).remainder(table.num_embeddings)[None]
    embeds = table(ids)  # [1, 8, H]
    # Dropout would make the two forwards differ: eval mode, then every module's own flag back
    # (the trainer sets ``training`` on decoder layers alone for gradient checkpointing).
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        projected = head(model.base_model(inputs_embeds=embeds, use_cache=False)[0])  # [1, 8, V]
        logits = model(inputs_embeds=embeds, use_cache=False).logits  # [1, 8, V]
    finally:
        for module, training in modes.items():
            module.training = training
    return projected.shape == logits.shape and torch.allclose(
        projected.float(), logits.float(), rtol=1e-4, atol=1e-5)


def target_loss(model: PreTrainedModel, batch: PromptedBatch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens, and their count.

    Only the hidden states that predict a target token go through the vocabulary projection
    (the largest single cost of a step): ``[N, H] -> [N, V]`` instead of ``[B, L, V]``, where
    :func:`plain_head` found that this gives the model's logits.
    Summing (not averaging) lets the caller normalise over a whole accumulated, possibly
    distributed, batch so that micro-batching never changes the gradient.
    """
    assert batch.labels is not None
    targets = batch.labels[:, 1:]  # token t+1 is predicted at position t
    keep = targets != IGNORE_INDEX  # [B, L - 1]
    count = int(keep.sum())
    if plain_head(model):
        hidden = model.base_model(**_forward_args(model.base_model, batch))[0]
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    else:
        logits = model(**_forward_args(model, batch)).logits[:, :-1][keep]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, count


def rows_loss(model: PreTrainedModel, prompt: PromptLike,
              rows: list[tuple[list[int], list[int]]], pad_id: int, bos_offset: int = 0,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """Summed target cross-entropy of encoded ``(ids, labels)`` rows behind ``prompt`` (``[P, H]``
    or a :class:`KVPrefix`), and the number of targets: the loss of one training (micro-)batch.

    Rows are right-padded so that no attention mask is needed (:func:`right_padded_batch`),
    and only target positions reach the vocabulary projection (:func:`target_loss`).
    """
    batch = collate(rows, pad_id, device, side="right")
    return target_loss(model, right_padded_batch(model, prompt, batch["input_ids"],
                                                 batch["labels"], bos_offset))


def full_logits(model: PreTrainedModel, batch: PromptedBatch) -> torch.Tensor:
    """``[B, L, V]`` logits of the merged batch (the reference path: no cache but a KV
    prefix's)."""
    return model(**_forward_args(model, batch)).logits


def _forward_args(module, batch: PromptedBatch) -> dict:
    """Keyword arguments of one forward of ``batch`` through ``module`` (a model or its base);
    a KV prefix goes in as the past cache."""
    args = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "use_cache": False}
    if batch.cache is not None:
        args[_cache_kwarg(module)] = batch.cache
    return args


# --- the prompt's key/value cache -------------------------------------------------------------

_CACHE_ARG: dict[type, str] = {}


def _cache_kwarg(model: PreTrainedModel) -> str:
    """transformers 5 calls it ``cache``, 4.x ``past_key_values``."""
    cls = type(model)
    if cls not in _CACHE_ARG:
        params = inspect.signature(model.forward).parameters
        _CACHE_ARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARG[cls]


def _output_cache(outputs):
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values


@dataclass
class PromptCache:
    """The ``[BOS? | P]`` prefix's keys and values, computed once per prompt.

    ``layers[i]`` is ``(keys, values)``, each ``[1, heads, C, head_dim]`` with ``C = length``.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    def expand(self, batch_size: int) -> DynamicCache:
        """A plain transformers ``DynamicCache`` for ``batch_size`` rows, each starting with a
        copy of the prefix. Generation uses :func:`reserved_cache` instead, which does not
        re-copy every layer's keys and values at each decoding step."""
        return DynamicCache([(k.expand(batch_size, -1, -1, -1).contiguous(),
                              v.expand(batch_size, -1, -1, -1).contiguous())
                             for k, v in self.layers])


class _ReservedLayer(DynamicLayer):
    """A cache layer whose keys/values live in ``[B, heads, capacity, d]`` buffers.

    ``update`` copies the new positions into place and exposes ``[:, :, :length]`` views, where
    ``DynamicLayer`` concatenates, i.e. copies the whole cache, at every step (measured: 34% of
    a decoding step at batch 16 over 300 cached positions). Past ``capacity`` it grows by
    doubling, so it stays correct if a caller under-reserves.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def _reserve(self, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New ``capacity``-position buffers holding ``keys``/``values`` ``[B, heads, n, d]``."""
        n = keys.shape[2]
        self._k = keys.new_empty(keys.shape[0], keys.shape[1], capacity, keys.shape[3])
        self._v = values.new_empty(values.shape[0], values.shape[1], capacity, values.shape[3])
        self._k[:, :, :n], self._v[:, :, :n] = keys, values
        self.capacity = capacity
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._reserve(self.capacity, key_states[:, :, :0], value_states[:, :, :0])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        if end > self.capacity:
            self._reserve(max(end, 2 * self.capacity), self.keys, self.values)
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._reserve(self.capacity, self.keys[indices], self.values[indices])


def reserved_cache(capacity: int, prefix: PromptCache | None = None,
                   batch_size: int = 1) -> DynamicCache:
    """A ``DynamicCache`` whose layers reserve ``capacity`` positions up front.

    Starts with ``prefix`` copied into each of ``batch_size`` rows, or empty (its layers then
    take their batch size from the first forward).
    """
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(_ReservedLayer, capacity)
    if prefix is not None:
        for k, v in prefix.layers:
            layer = _ReservedLayer(capacity)
            layer.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
            cache.layers.append(layer)
    return cache


def prefix_embeds(model: PreTrainedModel, prompt: torch.Tensor,
                  bos_token_id: int | None) -> torch.Tensor:
    """``[1, C, H]``: BOS embedding (if any) followed by the prompt ``[P, H]``."""
    weight = model.get_input_embeddings().weight
    parts = [prompt.to(device=weight.device, dtype=weight.dtype)]
    if bos_token_id is not None:
        parts.insert(0, embed(model, torch.tensor([bos_token_id], device=weight.device)))
    return torch.cat(parts, 0).unsqueeze(0)


@torch.no_grad()
def build_prompt_cache(model: PreTrainedModel, prompt: PromptLike | None,
                       bos_token_id: int | None = None) -> PromptCache | None:
    """Compile a prompt of any method to the key/value cache that stands before every input.

    A ``[P, H]`` prompt: one forward of ``[BOS? | P]``. A :class:`KVPrefix`: its keys and
    values, then BOS (where the tokenizer adds one) run on top of them at position ``P``.
    Returns None when there is nothing to cache (no prompt and no BOS).
    """
    if isinstance(prompt, KVPrefix):
        check_fits(prompt, model)
        weight = model.get_input_embeddings().weight
        layers = prompt.layers(weight.dtype, weight.device)
        p = prompt.num_virtual_tokens
        if bos_token_id is None:
            return PromptCache(layers, p)
        ids = torch.tensor([[bos_token_id]], device=weight.device)
        out = model(input_ids=ids, attention_mask=torch.ones(1, p + 1, dtype=torch.long,
                                                              device=weight.device),
                    position_ids=torch.tensor([[p]], device=weight.device), use_cache=True,
                    **{_cache_kwarg(model): DynamicCache(layers)})
        cache = _output_cache(out)
        return PromptCache([(layer.keys, layer.values) for layer in cache.layers], p + 1)
    if prompt is None or prompt.shape[0] == 0:
        if bos_token_id is None:
            return None
        prompt = empty_prompt(model)
    embeds = prefix_embeds(model, prompt, bos_token_id)  # [1, C, H]
    length = embeds.shape[1]
    mask = torch.ones(1, length, dtype=torch.long, device=embeds.device)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                use_cache=True)
    cache = _output_cache(out)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return PromptCache(layers, length)


@torch.no_grad()
def tokens_kv(model: PreTrainedModel, token_ids: list[int]) -> KVPrefix:
    """The key/value prefix that ``token_ids`` leave in the cache (positions 0..n-1, no BOS):
    a KV prefix that stands for that text exactly (prefix tuning's text init).

    Returns ``KVPrefix`` ``[L, 2, kv_heads, n, head_dim]`` float32 on the model's device.
    """
    if not token_ids:
        raise ValueError("tokens_kv needs at least one token")
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([token_ids], device=device)  # [1, n]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(len(token_ids), device=device)[None], use_cache=True)
    layers = _output_cache(out).layers
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])
    layers_n, kv_heads, head_dim = kv_shape(model.config)
    assert kv.shape == (layers_n, 2, kv_heads, len(token_ids), head_dim), kv.shape
    return KVPrefix(kv.float())


def cached_forward(model: PreTrainedModel, cache: DynamicCache, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """One forward of ``input_ids`` ``[B, S]`` on top of ``cache``.

    ``attention_mask`` covers the cache and the new tokens: ``[B, cache_len + S]``.
    Returns ``(last_logits [B, V], cache)``.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return out.logits[:, -1], _output_cache(out)


def select_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """Keep only the batch rows ``index`` ``[A]`` of a cache (finished rows leave the batch)."""
    cache.batch_select_indices(index)
    return cache


def first_positions(prefix_length: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, T]`` of left-padded tokens that follow a cached prefix."""
    return positions_from_mask(attention_mask, offset=prefix_length)


# --- one cache for rows with different prefixes (the serving engine's batches) ----------------
# Rows are right-aligned: each row's slots are [masked | its prefix | its tokens ...], so every
# row's newest token sits in the last slot and one decoding step appends one slot to all.


def left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, S]`` -> ``[B, width]`` with zeros (masked slots) on the left."""
    extra = width - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1) if extra else mask


def _left_pad_slots(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, kv, S, d]`` -> ``[B, kv, width, d]``, zeros on the left."""
    extra = width - t.shape[2]
    if not extra:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3]), t], 2)


def fill_prefixes(cache: DynamicCache, prefixes: list[PromptCache | None], width: int) -> None:
    """Write row ``i``'s prefix right-aligned into the first ``width`` slots of an empty
    (reserved) cache: ``[n, kv, width, d]`` per layer, zeros (to be masked) before each
    prefix; a None prefix leaves its row all zeros."""
    n = len(prefixes)
    first = next(p for p in prefixes if p is not None)
    for layer_idx, (k0, v0) in enumerate(first.layers):
        keys = k0.new_zeros(n, k0.shape[1], width, k0.shape[3])  # [n, kv, width, d]
        values = v0.new_zeros(n, v0.shape[1], width, v0.shape[3])
        for i, p in enumerate(prefixes):
            if p is not None and p.length:
                k, v = p.layers[layer_idx]  # [1, kv, C_i, d]
                keys[i, :, width - p.length:] = k[0]
                values[i, :, width - p.length:] = v[0]
        cache.update(keys, values, layer_idx)


def concat_rows(caches: list[DynamicCache], width: int, capacity: int) -> DynamicCache:
    """A reserved cache of ``capacity`` slots holding the rows of each cache in turn, each
    left-padded (masked slots) to ``width`` slots."""
    out = reserved_cache(capacity)
    for idx, layers in enumerate(zip(*(c.layers for c in caches))):
        keys = torch.cat([_left_pad_slots(layer.keys, width) for layer in layers], 0)
        values = torch.cat([_left_pad_slots(layer.values, width) for layer in layers], 0)
        out.update(keys, values, idx)
    return out


def drop_leading_slots(cache: DynamicCache, lead: int) -> None:
    """Drop the first ``lead`` slots of every layer of a reserved cache, in place."""
    for layer in cache.layers:
        layer._reserve(layer.capacity, layer.keys[:, :, lead:], layer.values[:, :, lead:])
