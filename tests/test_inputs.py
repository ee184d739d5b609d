"""Parity tests for the one module that merges the prompt with inputs."""

from __future__ import annotations

import pytest
import torch

from softprompt.batching import collate
from softprompt.config import GenerationConfig
from softprompt.encode import adds_bos
from softprompt.errors import SoftPromptError
from softprompt.generation import generate, generate_reference
from softprompt.inputs import (
    IGNORE_INDEX,
    build_prompt_cache,
    cached_forward,
    empty_prompt,
    first_positions,
    full_logits,
    insert_prompt,
    plain_head,
    positions_from_mask,
    prompted_batch,
    reserved_cache,
    right_padded_batch,
    target_loss,
)

TEXTS = ["A dog runs on the beach.", "Two children play football in a park near the river.",
         "Rain."]


def _prompt(model, p=5, seed=1):
    h = model.config.hidden_size
    return torch.randn(p, h, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_insert_prompt_places_prompt_before_first_real_token():
    # 2 rows, T=4, H=1; row 0 has 2 pads, row 1 none. Token embeds = their ids.
    ids = torch.tensor([[0, 0, 7, 8], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    prompt = torch.tensor([[-1.0], [-2.0]])
    b = insert_prompt(ids.unsqueeze(-1).float(), mask, prompt, labels=ids.clone())
    assert b.inputs_embeds[..., 0].tolist() == [[0, 0, -1, -2, 7, 8], [-1, -2, 5, 6, 7, 8]]
    assert b.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert b.labels.tolist() == [[0, 0, IGNORE_INDEX, IGNORE_INDEX, 7, 8],
                                 [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8]]
    # With BOS the prompt goes after it.
    b = insert_prompt(ids.unsqueeze(-1).float(), mask, prompt, bos_offset=1)
    assert b.inputs_embeds[..., 0].tolist() == [[0, 0, 7, -1, -2, 8], [5, -1, -2, 6, 7, 8]]


def test_positions_from_mask_with_offset():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert positions_from_mask(mask, offset=3).tolist() == [[0, 3, 4], [3, 4, 5]]


def test_left_padded_batch_matches_each_row_alone(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    bos = int(adds_bos(tok))
    rows = [(tok(t).input_ids, tok(t).input_ids) for t in TEXTS]
    batch = collate(rows, tok.pad_token_id)
    merged = prompted_batch(model, prompt, batch["input_ids"], batch["attention_mask"],
                            bos_offset=bos)
    batched = full_logits(model, merged)[:, -1]  # [B, V]
    for i, (ids, _) in enumerate(rows):
        one = torch.tensor([ids])
        alone = full_logits(model, prompted_batch(model, prompt, one, torch.ones_like(one),
                                                  bos_offset=bos))[0, -1]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)


def test_target_loss_equals_full_logits_loss(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    rows = []
    for t in TEXTS:
        ids = tok(t).input_ids
        target = tok(" target words", add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((ids + target, [IGNORE_INDEX] * len(ids) + target))
    batch = collate(rows, tok.pad_token_id)
    merged = prompted_batch(model, prompt, batch["input_ids"], batch["attention_mask"],
                            batch["labels"], int(adds_bos(tok)))
    loss_sum, count = target_loss(model, merged)
    logits = full_logits(model, merged)[:, :-1]
    labels = merged.labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), reduction="sum")
    assert count == sum(len(tok(" target words", add_special_tokens=False).input_ids) + 1
                        for _ in TEXTS)
    torch.testing.assert_close(loss_sum, expected, atol=1e-4, rtol=1e-5)


def test_right_padded_layout_equals_left_padded_in_loss_and_gradient(tiny):
    model, tok, _ = tiny
    bos = int(adds_bos(tok))
    rows = []
    for i, t in enumerate(TEXTS):  # rows of different lengths: padding in both layouts
        ids = tok(t).input_ids
        target = tok(" target" + " words" * i, add_special_tokens=False).input_ids
        rows.append((ids + target, [IGNORE_INDEX] * len(ids) + target))
    grads, losses = [], []
    for side in ("left", "right"):
        prompt = _prompt(model).requires_grad_()
        batch = collate(rows, tok.pad_token_id, side=side)
        if side == "left":
            merged = prompted_batch(model, prompt, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], bos)
        else:
            merged = right_padded_batch(model, prompt, batch["input_ids"], batch["labels"], bos)
            assert merged.attention_mask is None and merged.position_ids is None
            # Pads come last in every row: [BOS? | P | tokens | pads].
            assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][2].all()
        loss, count = target_loss(model, merged)
        loss.backward()
        losses.append((loss, count))
        grads.append(prompt.grad)
    assert losses[0][1] == losses[1][1] > 0
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-4, rtol=1e-5)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_reserved_cache_decodes_like_dynamic_cache_and_writes_in_place(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model, p=3)
    bos = tok.bos_token_id if adds_bos(tok) else None
    prefix = build_prompt_cache(model, prompt, bos)
    rows = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    batch = collate([(ids, ids) for ids in rows], tok.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    # capacity 2 positions short of what 4 steps reach: the buffers must grow once, correctly.
    caches = {"dynamic": prefix.expand(3),
              "reserved": reserved_cache(prefix.length + width + 2, prefix, 3)}
    logits = {}
    buffers = []
    for name, cache in caches.items():
        full = torch.cat([mask.new_ones(3, prefix.length), mask], 1)
        pos = first_positions(prefix.length, mask)
        out, cache = cached_forward(model, cache, ids, full, pos)
        steps, next_pos, keep = [out], pos[:, -1:] + 1, torch.arange(3)
        for step in range(4):
            if step == 2:  # row 1 leaves the batch
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(torch.tensor([0, 2]))
                full, next_pos, out = full[[0, 2]], next_pos[[0, 2]], out[[0, 2]]
            if name == "reserved":
                buffers.append(cache.layers[0]._k)  # held: no address reuse
            full = torch.cat([full, full.new_ones(len(keep), 1)], 1)
            out, cache = cached_forward(model, cache, out.argmax(-1, keepdim=True), full, next_pos)
            next_pos = next_pos + 1
            steps.append(out)
        logits[name] = steps
    for a, b in zip(logits["dynamic"], logits["reserved"], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    # Steps write into the same buffer, except after row selection (step 2) and growth (step 3).
    assert buffers[1] is buffers[0]
    assert buffers[2] is not buffers[1] and buffers[3] is not buffers[2]
    assert len({b.data_ptr() for b in buffers}) == 3
    assert caches["reserved"].layers[0].keys.shape[2] == prefix.length + width + 4


def test_reserved_cache_without_prefix_starts_empty(tiny):
    model, tok, _ = tiny
    ids = torch.tensor([tok("Two dogs", add_special_tokens=False).input_ids])
    mask = torch.ones_like(ids)
    cache = reserved_cache(ids.shape[1] + 1)
    out, cache = cached_forward(model, cache, ids, mask, positions_from_mask(mask))
    ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]


def test_cached_generation_equals_uncached_token_for_token(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model, p=4, seed=3)
    cfg = GenerationConfig(max_new_tokens=12, batch_size=3)
    fast = generate(model, tok, TEXTS, prompt, cfg)
    for text, out in zip(TEXTS, fast):
        ref = tok.decode(generate_reference(model, tok, text, prompt, 12),
                         skip_special_tokens=True).strip()
        assert out == ref


def test_prompt_cache_is_computed_once_and_has_prefix_length(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model, p=6)
    bos = tok.bos_token_id if adds_bos(tok) else None
    cache = build_prompt_cache(model, prompt, bos)
    assert cache.length == 6 + (bos is not None)
    assert len(cache.layers) == model.config.num_hidden_layers
    k, v = cache.layers[0]
    assert k.shape[0] == 1 and k.shape[2] == cache.length
    expanded = cache.expand(3)
    assert expanded.get_seq_length() == cache.length


def test_rows_leaving_the_batch_early_do_not_change_the_others(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model, p=3, seed=5)
    texts = TEXTS + ["The old man reads a newspaper on a bench.", "Snow falls."]
    for stop in ("e", "a", None):
        cfg = GenerationConfig(max_new_tokens=10, batch_size=5)
        together = generate(model, tok, texts, prompt, cfg, stop=stop)
        alone = [generate(model, tok, [t], prompt, GenerationConfig(max_new_tokens=10),
                          stop=stop)[0]
                 for t in texts]
        assert together == alone
        if stop:  # rows really did stop at different steps
            assert len({len(x) for x in together}) > 1


# --- target-only logits, checked per model (defect 8) -----------------------------------------


def _scaled_gpt2(model_dir):
    """The tiny GPT-2 with its logits tripled after the head, as a model's forward may
    post-process them (Gemma 2 soft-caps, Cohere scales) without a config name saying so."""
    from transformers import GPT2LMHeadModel

    from softprompt.models import freeze

    class ScaledGPT2(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    return freeze(ScaledGPT2.from_pretrained(model_dir))


def _loss_rows(tok):
    rows = []
    for t in TEXTS:
        ids = tok(t).input_ids
        target = tok(" target words", add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((ids + target, [IGNORE_INDEX] * len(ids) + target))
    return rows


def _full_logits_loss(model, merged) -> torch.Tensor:
    logits = full_logits(model, merged)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             merged.labels[:, 1:].reshape(-1), reduction="sum")


def _assert_takes_full_logits(model, tok) -> None:
    """The target loss of a model whose logits are post-processed equals the full-logits loss,
    and the probe said so."""
    batch = collate(_loss_rows(tok), tok.pad_token_id, side="right")
    merged = right_padded_batch(model, _prompt(model), batch["input_ids"], batch["labels"])
    loss_sum, _ = target_loss(model, merged)
    torch.testing.assert_close(loss_sum, _full_logits_loss(model, merged), atol=1e-4, rtol=1e-5)
    assert not plain_head(model)


def test_post_processed_logits_take_the_full_logits_path(tiny_dirs):
    from softprompt.models import load_model

    _, tok = load_model(str(tiny_dirs["gpt2"]))
    model = _scaled_gpt2(tiny_dirs["gpt2"])
    _assert_takes_full_logits(model, tok)


def test_soft_capped_gemma2_takes_the_full_logits_path(tiny_dirs):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from softprompt.models import load_model

    _, tok = load_model(str(tiny_dirs["gpt2"]))
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, final_logit_softcapping=0.5, pad_token_id=0)
    model = Gemma2ForCausalLM(cfg).eval()
    _assert_takes_full_logits(model, tok)


def test_plain_heads_take_the_target_only_path(tiny):
    model, tok, _ = tiny
    assert plain_head(model)
    # Checked once per model: the answer is kept, no second probe forward.
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        assert plain_head(model)
    finally:
        handle.remove()
    assert forwards == []


def test_empty_prompt_and_the_one_width_check(tiny):
    model, tok, _ = tiny
    empty = empty_prompt(model)
    assert empty.shape == (0, 32) and empty.dtype == model.get_input_embeddings().weight.dtype
    ids = torch.tensor([tok("Rain.").input_ids])
    plain = prompted_batch(model, empty, ids, torch.ones_like(ids))
    torch.testing.assert_close(full_logits(model, plain), model(input_ids=ids).logits)
    # A prompt of another width is refused with the same one-line error as loading one.
    with pytest.raises(SoftPromptError, match=r"^prompt hidden size 16 does not match the "
                                              r"model's 32; use the --model"):
        prompted_batch(model, torch.zeros(3, 16), ids, torch.ones_like(ids))


def test_rows_behind_different_prefixes_share_one_cache_as_if_alone(tiny):
    """Mixed-prefix layout: two prompts of different lengths right-aligned in one cache, a
    row with no prefix beside them, then a second batch joined with concat_rows; every next
    token's logits equal the row run alone behind its own prefix."""
    from softprompt.inputs import concat_rows, drop_leading_slots, fill_prefixes, left_pad_mask

    model, tok, _ = tiny
    bos = tok.bos_token_id if adds_bos(tok) else None
    prompts = [_prompt(model, p=2, seed=1), _prompt(model, p=6, seed=2)]
    prefixes = [build_prompt_cache(model, p, bos) for p in prompts]
    ids = [tok(t).input_ids[1 if bos is not None else 0:] for t in TEXTS[:2]]

    def alone(prefix, row_ids):
        cache = reserved_cache(64, prefix, 1)
        n = prefix.length
        x = torch.tensor([row_ids])
        mask = torch.ones(1, n + len(row_ids), dtype=torch.long)
        return cached_forward(model, cache, x, mask, torch.arange(n, n + len(row_ids))[None])[0]

    def batch(pair, row_ids):
        width = max(p.length for p in pair)
        t = max(len(r) for r in row_ids)
        cache = reserved_cache(64)
        fill_prefixes(cache, list(pair), width)
        x = torch.full((2, t), tok.pad_token_id)
        mask = torch.zeros(2, width + t, dtype=torch.long)
        pos = torch.zeros(2, t, dtype=torch.long)
        for i, (p, r) in enumerate(zip(pair, row_ids)):
            x[i, t - len(r):] = torch.tensor(r)
            mask[i, width - p.length:width] = 1
            mask[i, width + t - len(r):] = 1
            pos[i, t - len(r):] = torch.arange(p.length, p.length + len(r))
        logits, cache = cached_forward(model, cache, x, mask, pos)
        return logits, cache, mask

    first, cache_a, mask_a = batch(prefixes, ids)
    for i in range(2):
        torch.testing.assert_close(first[i], alone(prefixes[i], ids[i])[0], atol=1e-5, rtol=1e-4)
    second, cache_b, mask_b = batch(prefixes[::-1], ids[::-1])
    width = max(mask_a.shape[1], mask_b.shape[1]) + 3  # extra masked slots change nothing
    joined = concat_rows([cache_a, cache_b], width, width + 8)
    mask = torch.cat([left_pad_mask(mask_a, width), left_pad_mask(mask_b, width)], 0)
    drop_leading_slots(joined, 2)  # slots nobody attends to
    mask = mask[:, 2:]
    assert joined.layers[0].keys.shape[2] == mask.shape[1]
    nxt = torch.cat([first.argmax(-1), second.argmax(-1)])[:, None]  # [4, 1]
    mask = torch.cat([mask, mask.new_ones(4, 1)], 1)
    order = [0, 1, 1, 0]
    pos = torch.tensor([[prefixes[k].length + len(ids[k])] for k in order])
    step, _ = cached_forward(model, joined, nxt, mask, pos)
    for row, k in enumerate(order):
        want = alone(prefixes[k], ids[k] + [int(nxt[row])])
        torch.testing.assert_close(step[row], want[0], atol=1e-5, rtol=1e-4)
