"""Decoding controls and beam search: every output equals transformers' ``generate`` with the
same setting, on the same inputs embedded by hand in the reference layout
``[pad.. | BOS? | P prompt | tokens..]`` (``input_ids`` passed alongside, so that the controls
weigh the input's tokens as they do for a plain or PEFT-prompted model)."""

from __future__ import annotations

import warnings

import pytest
import torch

from softprompt.config import GenerationConfig
from softprompt.encode import adds_bos
from softprompt.errors import SoftPromptError
from softprompt.generation import cut_at_stop, generate, generate_ids, hits_stop
from softprompt.inputs import prompted_batch

TEXTS = ["A dog runs on the beach.", "Two children play football in a park near the river.",
         "Rain.", "A man in a red shirt reads a newspaper on a bench."]


def _prompt(model, p=4, seed=3):
    return torch.randn(p, model.config.hidden_size,
                       generator=torch.Generator().manual_seed(seed)) * 0.5


def _reference(model, tok, texts, prompt, with_ids=True, **options) -> list[list[int]]:
    """transformers' new ids for each text (cut after EOS), the prompt spliced in by hand;
    ``with_ids=False``: ``inputs_embeds`` alone (its processors then see the output alone)."""
    ids = [tok(t).input_ids for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    batch = prompted_batch(model, prompt, input_ids, mask, bos_offset=int(adds_bos(tok)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=input_ids if with_ids else None,
                             inputs_embeds=batch.inputs_embeds,
                             attention_mask=batch.attention_mask, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             **options)
    rows = []
    for row in out[:, width if with_ids else 0:].tolist():
        rows.append(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return rows


def _ours(model, tok, texts, prompt, **options) -> list[list[int]]:
    return generate_ids(model, tok, texts, prompt, GenerationConfig(batch_size=3, **options))


def _set_eos(tok, token_id: int) -> None:
    tok.eos_token = tok.convert_ids_to_tokens(token_id)
    assert tok.eos_token_id == token_id


@pytest.mark.parametrize("control", [{"repetition_penalty": 1.5},
                                     {"repetition_penalty": 0.7}])
def test_greedy_with_repetition_penalty_equals_transformers(tiny, control):
    model, tok, _ = tiny
    prompt = _prompt(model)
    plain = _ours(model, tok, TEXTS, prompt, max_new_tokens=12)
    ours = _ours(model, tok, TEXTS, prompt, max_new_tokens=12, **control)
    assert ours == _reference(model, tok, TEXTS, prompt, max_new_tokens=12, **control)
    assert ours != plain  # the control changed something: the comparison can fail


@pytest.mark.parametrize("size", [2, 3])
def test_greedy_with_no_repeat_ngrams_equals_transformers(tiny, size):
    """A penalty below 1 rewards repeats (a fresh tiny Llama rarely repeats on its own); the
    ban then has n-grams to ban, from the input and the output."""
    model, tok, _ = tiny
    prompt = _prompt(model)
    repeating = _ours(model, tok, TEXTS, prompt, max_new_tokens=12, repetition_penalty=0.5)
    ours = _ours(model, tok, TEXTS, prompt, max_new_tokens=12, repetition_penalty=0.5,
                 no_repeat_ngram_size=size)
    assert ours == _reference(model, tok, TEXTS, prompt, max_new_tokens=12,
                              repetition_penalty=0.5, no_repeat_ngram_size=size)
    assert ours != repeating
    for text, row in zip(TEXTS, ours):  # no n-gram of input + output twice
        seq = tok(text).input_ids + row
        grams = [tuple(seq[i:i + size]) for i in range(len(seq) - size + 1)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_penalties_over_the_output_alone_equal_transformers(tiny, num_beams):
    """``penalize_output_only``: the input's first ``T`` (padded) ids are ignored, as
    transformers' RepetitionPenaltyLogitsProcessor(prompt_ignore_length=T) does; the n-gram ban
    over the output alone is transformers' with ``inputs_embeds`` and no ``input_ids``."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    model, tok, _ = tiny
    prompt = _prompt(model)
    width = max(len(tok(t).input_ids) for t in TEXTS)
    common = {"max_new_tokens": 12, "num_beams": num_beams}
    ours = _ours(model, tok, TEXTS, prompt, repetition_penalty=1.5, penalize_output_only=True,
                 **common)
    ignore_input = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
        1.5, prompt_ignore_length=width)])
    assert ours == _reference(model, tok, TEXTS, prompt, logits_processor=ignore_input,
                              **common)
    if num_beams == 1:  # leaving the input out changes greedy outputs: the check can fail
        assert ours != _ours(model, tok, TEXTS, prompt, repetition_penalty=1.5, **common)

    options = {"repetition_penalty": 0.5, "no_repeat_ngram_size": 2}
    ours = _ours(model, tok, TEXTS, prompt, penalize_output_only=True, **options, **common)
    reward = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(0.5)])
    assert ours == _reference(model, tok, TEXTS, prompt, with_ids=False,
                              logits_processor=reward, no_repeat_ngram_size=2, **common)
    if num_beams == 1:
        assert ours != _ours(model, tok, TEXTS, prompt, **options, **common)
    for row in ours:  # no n-gram of the output twice (the input's may recur)
        grams = [tuple(row[i:i + 2]) for i in range(len(row) - 1)]
        assert len(grams) == len(set(grams))


def test_min_new_tokens_holds_eos_back_like_transformers(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    plain = _ours(model, tok, TEXTS, prompt, max_new_tokens=10)
    # A row's first new token not generated before becomes EOS: the row ends there.
    r, at = next((r, i) for r, row in enumerate(plain) for i in range(1, len(row))
                 if row[i] not in row[:i])
    _set_eos(tok, plain[r][at])
    stopped = _ours(model, tok, TEXTS, prompt, max_new_tokens=10)
    assert stopped[r] == plain[r][:at]
    held = _ours(model, tok, TEXTS, prompt, max_new_tokens=10, min_new_tokens=at + 3)
    assert len(held[r]) >= at + 3 and held[r][:at] == plain[r][:at]
    assert held == _reference(model, tok, TEXTS, prompt, max_new_tokens=10,
                              min_new_tokens=at + 3)


def test_all_controls_together_equal_transformers(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    options = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 3,
               "max_new_tokens": 12}
    assert (_ours(model, tok, TEXTS, prompt, **options)
            == _reference(model, tok, TEXTS, prompt, **options))


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(tiny, num_beams):
    model, tok, _ = tiny
    prompt = _prompt(model)
    greedy = _ours(model, tok, TEXTS, prompt, max_new_tokens=10)
    ours = _ours(model, tok, TEXTS, prompt, max_new_tokens=10, num_beams=num_beams)
    assert ours == _reference(model, tok, TEXTS, prompt, max_new_tokens=10,
                              num_beams=num_beams)
    assert ours != greedy


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_with_hypotheses_ending_early_equals_transformers(tiny, num_beams):
    """EOS set to a token the model often predicts: hypotheses finish at different steps, the
    finished ones compete by mean log-probability, and inputs leave the batch early."""
    model, tok, _ = tiny
    prompt = _prompt(model)
    before = _ours(model, tok, TEXTS, prompt, max_new_tokens=10, num_beams=num_beams)
    counts: dict[int, int] = {}
    for row in before:
        for t in set(row):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)
    _set_eos(tok, eos)
    ours = _ours(model, tok, TEXTS, prompt, max_new_tokens=10, num_beams=num_beams)
    assert ours == _reference(model, tok, TEXTS, prompt, max_new_tokens=10,
                              num_beams=num_beams)
    assert all(eos not in row for row in ours)


def test_beam_search_with_controls_equals_transformers(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    options = {"num_beams": 3, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2,
               "min_new_tokens": 2, "max_new_tokens": 10}
    assert (_ours(model, tok, TEXTS, prompt, **options)
            == _reference(model, tok, TEXTS, prompt, **options))


def test_beam_search_without_prompt_equals_plain_generate(tiny):
    model, tok, _ = tiny
    ours = generate_ids(model, tok, TEXTS, None, GenerationConfig(max_new_tokens=8,
                                                                  num_beams=3))
    ids = [tok(t).input_ids for t in TEXTS]
    for text_ids, row in zip(ids, ours):
        out = model.generate(torch.tensor([text_ids]), max_new_tokens=8, num_beams=3,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        ref = out[0, len(text_ids):].tolist()
        assert row == (ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)


def test_beam_search_ends_a_hypothesis_at_a_stop_string(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    cfg = GenerationConfig(max_new_tokens=12, num_beams=2)
    (best,) = generate_ids(model, tok, [TEXTS[1]], prompt, cfg)
    # A word of a middle token of the best output (after some text) becomes the stop string.
    stop = next(w for w in (tok.decode([t]).strip() for t in best[1:-1]) if w.isalpha())
    (ids,) = generate_ids(model, tok, [TEXTS[1]], prompt, cfg, stop=stop)
    # Hypotheses end where the stop string appears (they then compete by mean log-probability
    # with the others): the best one holds it nowhere but in its last token, if at all.
    assert not hits_stop(tok, ids[:-1], stop)
    assert ids != best
    (cut,) = generate(model, tok, [TEXTS[1]], prompt, cfg, stop=stop)
    assert stop not in cut and cut == cut_at_stop(tok.decode(ids, skip_special_tokens=True),
                                                   stop)[0]


@pytest.mark.parametrize("options, message", [
    ({"repetition_penalty": 0.0}, "--repetition-penalty must be positive"),
    ({"no_repeat_ngram_size": -1}, "--no-repeat-ngram-size must be zero (off) or a positive"),
    ({"min_new_tokens": -2}, "--min-new-tokens must be zero (off) or a positive"),
    ({"num_beams": 0}, "--num-beams must be positive"),
    ({"num_beams": 2, "temperature": 0.7}, "--num-beams 2 searches deterministically"),
])
def test_bad_decoding_settings_are_refused_in_one_line(options, message):
    with pytest.raises(SoftPromptError) as err:
        GenerationConfig(**options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_beam_search_behind_a_kv_prefix_equals_the_text_it_stands_for(tiny):
    """A KV prefix made of a text's keys/values (inputs.tokens_kv) decodes as the plain model
    does after that text: ``[BOS? A | BOS? B]`` behind the prefix == the ids ``A BOS? B``."""
    from softprompt.inputs import tokens_kv

    model, tok, _ = tiny
    lead = [tok.bos_token_id] if adds_bos(tok) else []
    text = tok("Summary: Answer:", add_special_tokens=False).input_ids
    prefix = tokens_kv(model, lead + text)
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, batch_size=4)
    ours = generate_ids(model, tok, TEXTS, prefix, cfg)
    inputs = [text + lead + tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    assert ours == generate_ids(model, tok, inputs, None, cfg)


def test_a_tasks_decoding_defaults_apply_unless_overridden(tiny):
    from dataclasses import replace

    from softprompt.api import PromptedModel
    from softprompt.tasks import Task, get_task

    model, tok, _ = tiny
    prompt = _prompt(model)
    base = get_task("translation")
    task = replace(base, decoding={"repetition_penalty": 1.5, "no_repeat_ngram_size": 2})
    assert Task.from_dict(task.to_dict()) == task  # saved with a prompt, loaded back
    pm = PromptedModel(model, tok, prompt, task, "tiny")
    text = pm.render(TEXTS[1])
    controlled = generate(model, tok, [text], prompt, GenerationConfig(
        max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2), stop=task.stop)[0]
    plain = generate(model, tok, [text], prompt, GenerationConfig(max_new_tokens=8),
                     stop=task.stop)[0]
    assert controlled != plain
    assert pm.generate(TEXTS[1], max_new_tokens=8) == controlled
    assert pm.generate(TEXTS[1], max_new_tokens=8, repetition_penalty=1.0,
                       no_repeat_ngram_size=0) == plain
    for bad, words in [({"num_beams": 2}, "task key 'decoding' must map some of"),
                       ({"repetition_penalty": -1.0}, "--repetition-penalty must be positive")]:
        with pytest.raises(SoftPromptError, match=words):
            Task.from_dict({**base.to_dict(), "decoding": bad})
