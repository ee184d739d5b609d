"""Decoding: inputs that must fit the model's positions, and stop strings that span tokens."""

from __future__ import annotations

import pytest
import torch

from softprompt import generation
from softprompt.api import PromptedModel
from softprompt.config import GenerationConfig
from softprompt.encode import context_limit, encode_example
from softprompt.errors import SoftPromptError
from softprompt.generation import cut_at_stop, generate, generate_reference
from softprompt.tasks import Task, get_task, make_example

SENTENCE = "The big brown dog sleeps under the table. "


def _prompt(model, p=4, seed=3):
    return torch.randn(p, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


# --- inputs longer than the model's positions (defect 4) --------------------------------------


def test_long_input_is_truncated_to_the_context_and_generates_like_the_cut_input(tiny):
    model, tok, _ = tiny
    assert context_limit(model) == 512  # the tiny models' positions
    task = get_task("translation")  # truncate_field "source"
    pm = PromptedModel(model, tok, _prompt(model), task, "tiny")
    long_source = SENTENCE * 80
    assert len(tok(long_source).input_ids) > 600  # past the 512 positions
    positions: list[int] = []  # the largest position id of each forward

    def watch(module, args, kwargs):
        positions.append(int(kwargs["position_ids"].max()))

    handle = model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        out = pm.generate({"source": long_source}, max_new_tokens=6)
    finally:
        handle.remove()
    assert max(positions) < 512  # RoPE (llama) would not crash past them, only drift
    # The cut input, as training cuts it: room for the 4-token prompt and 6 new tokens.
    example = make_example(task, {"source": long_source}, with_target=False)
    enc = encode_example(task, example, tok, num_virtual_tokens=4 + 6, max_length=512,
                         with_target=False)
    assert enc.truncated and 512 - 12 < 4 + len(enc.input_ids) + 6 <= 512
    text = tok.decode(enc.input_ids, skip_special_tokens=True)
    cut = text.removeprefix("English: ").removesuffix("\nGerman:")
    assert long_source.startswith(cut) and len(cut) < len(long_source) // 2
    assert out == pm.generate({"source": cut}, max_new_tokens=6)
    cfg = GenerationConfig(**{**task.generation_defaults(), "max_new_tokens": 6})
    assert out == generate(model, tok, [pm.render({"source": cut})], pm.prompt, cfg,
                           stop=task.stop)[0]


def test_too_long_input_is_refused_in_one_line_by_generate(tiny):
    model, tok, _ = tiny
    text = SENTENCE * 80
    n = len(tok(text).input_ids)
    with pytest.raises(SoftPromptError) as err:
        generate(model, tok, ["Rain.", text], _prompt(model), GenerationConfig(max_new_tokens=6))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"input 2 is {n} tokens; with the 4-token prompt and "
                              f"max_new_tokens=6 it needs {n + 10} positions but the model has "
                              f"512;")
    assert message.endswith("; shorten the input (a task's truncate field is cut to fit "
                            "--max-length) or lower --max-new-tokens")


def test_input_that_fits_only_without_new_tokens_is_refused(tiny):
    model, tok, _ = tiny
    ids = tok(SENTENCE * 80).input_ids[:500]  # 500 + 4 fit; 500 + 4 + 16 do not
    with pytest.raises(SoftPromptError, match="input 1 is 500 tokens; .* needs 520 positions"):
        generate(model, tok, [ids], _prompt(model), GenerationConfig(max_new_tokens=16))
    assert len(generate(model, tok, [ids], _prompt(model), GenerationConfig(max_new_tokens=8))) == 1


def test_long_input_without_a_truncate_field_is_refused_through_the_api(tiny):
    model, tok, _ = tiny
    task = Task("plain", "{text}\nAnswer:", "answer")  # no truncate_field
    pm = PromptedModel(model, tok, _prompt(model), task, "tiny")
    with pytest.raises(SoftPromptError, match=r"input 1 is \d+ tokens; with the 4-token prompt "
                                              r"and max_new_tokens=5 .* model has 512"):
        pm.generate(SENTENCE * 80, max_new_tokens=5)


# --- stop strings that span tokens (defect 5) -------------------------------------------------


def _spanning_stop(tok, ids: list[int]) -> tuple[str, int]:
    """A 2-character stop string made of the last character of token ``k`` and the first of
    token ``k + 1`` in the greedy output ``ids``, found in neither token alone nor earlier;
    returns it and ``k + 2``, the number of tokens decoding should stop after."""
    for k in range(len(ids) - 3):
        before = tok.decode(ids[:k + 1], skip_special_tokens=True)
        after = tok.decode(ids[:k + 2], skip_special_tokens=True)
        if not before.strip() or not after.startswith(before) or len(after) == len(before):
            continue
        stop = before[-1] + after[len(before)]
        if ("\ufffd" in stop or stop in before or stop in tok.decode([ids[k + 1]])
                or not cut_at_stop(after, stop)[1]):
            continue
        return stop, k + 2
    raise AssertionError(f"no spanning stop string in {ids}")


def test_stop_string_spanning_two_tokens_ends_decoding_at_that_step(tiny):
    model, tok, _ = tiny
    prompt = _prompt(model)
    text = "A dog runs on the beach."
    ids = generate_reference(model, tok, text, prompt, 16)
    stop, steps = _spanning_stop(tok, ids)
    assert steps < 16

    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        (out,) = generate(model, tok, [text], prompt, GenerationConfig(max_new_tokens=16),
                          stop=stop)
        stopped = len(forwards)
        forwards.clear()
        # The same run stopped by hand after `steps` tokens.
        generate(model, tok, [text], prompt, GenerationConfig(max_new_tokens=steps))
        by_hand = len(forwards)
    finally:
        handle.remove()
    assert stopped == by_hand
    assert out == cut_at_stop(tok.decode(ids[:steps], skip_special_tokens=True), stop)[0]


def test_stop_inside_leading_whitespace_does_not_count_across_tokens(tiny):
    _, tok, _ = tiny
    # "\n\n" made of two "\n" tokens before any text: not a stop yet; after "Hi" it is.
    nl = tok("\n", add_special_tokens=False).input_ids
    hi = tok("Hi", add_special_tokens=False).input_ids
    assert len(nl) == 1
    assert not generation.hits_stop(tok, nl + nl, "\n\n")
    assert not generation.hits_stop(tok, nl + nl + hi, "\n\n")
    assert not generation.hits_stop(tok, nl + nl + hi + nl, "\n\n")
    assert generation.hits_stop(tok, nl + nl + hi + nl + nl, "\n\n")
