"""The continuous-batching engine: every output of a mixed batch equals the request run alone."""

from __future__ import annotations

import pytest
import torch

from softprompt.config import GenerationConfig
from softprompt.engine import Engine, PrefixCache, SamplingParams
from softprompt.errors import SoftPromptError
from softprompt.generation import generate
from softprompt.inputs import build_prompt_cache, tokens_kv
from softprompt.prefix import content_key

TEXTS = ["A dog runs on the beach.", "Two children play football in a park near the river.",
         "Rain.", "A man in a red shirt reads a newspaper on a bench.", "Cats sleep.",
         "The old bridge crosses the river in the middle of the town."]


def _prompts(model) -> dict[str, torch.Tensor]:
    """Three prompts of different lengths (3, 5 and 8 virtual tokens)."""
    h = model.config.hidden_size
    return {f"p{n}": torch.randn(n, h, generator=torch.Generator().manual_seed(n)) * 0.7
            for n in (3, 5, 8)}


def _responsive(model) -> None:
    """Scale every weight matrix: a fresh tiny model predicts nearly the same tokens whatever
    its input; scaled, its greedy outputs depend on the prompt and the input."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)


def _engine(model, tok, **options) -> tuple[Engine, dict[str, torch.Tensor]]:
    """A responsive tiny model's engine with the three prompts registered."""
    _responsive(model)
    prompts = _prompts(model)
    engine = Engine(model, tok, **options)
    for name, tensor in prompts.items():
        engine.add_prompt(name, tensor)
    return engine, prompts


def _alone(model, tok, text, prompt, max_new_tokens, stop=None) -> str:
    return generate(model, tok, [text], prompt, GenerationConfig(max_new_tokens=max_new_tokens),
                    stop=stop)[0]


def test_mixed_prompts_in_one_batch_equal_each_request_alone(tiny):
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok, max_batch_size=32)
    names = [None, "p3", "p5", "p8"]
    jobs = [(TEXTS[i % len(TEXTS)], names[i % len(names)]) for i in range(12)]
    outs = engine.generate([t for t, _ in jobs], [n for _, n in jobs],
                           SamplingParams(max_new_tokens=10))
    expected = [_alone(model, tok, t, prompts.get(n), 10) for t, n in jobs]
    assert outs == expected
    assert len(set(outs)) > 4  # the prompts really steer the outputs apart
    # Each prompt's prefix (and the bare model's BOS, where it has one) was computed once and
    # reused for its other requests.
    bare = 1 if tok.bos_token_id is not None and tok("a").input_ids[0] == tok.bos_token_id else 0
    assert engine.prefixes.misses == 3 + bare and engine.prefixes.hits == 6 + 2 * bare


def test_requests_joining_a_running_batch_decode_as_if_alone(tiny):
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok)
    first = [engine.submit("p8", TEXTS[1], SamplingParams(max_new_tokens=12)),
             engine.submit("p3", TEXTS[2], SamplingParams(max_new_tokens=4))]
    for _ in range(3):
        engine.step()
    assert engine.stats()["running"] == 2
    later = [engine.submit("p5", TEXTS[3], SamplingParams(max_new_tokens=9)),
             engine.submit(None, TEXTS[0], SamplingParams(max_new_tokens=7))]
    engine.step()  # both newcomers join the two running rows
    assert engine.stats()["running"] == 3  # the 4-token request finished
    engine.run_until_idle()
    got = [h.result(timeout=0).text for h in first + later]
    expected = [_alone(model, tok, TEXTS[1], prompts["p8"], 12),
                _alone(model, tok, TEXTS[2], prompts["p3"], 4),
                _alone(model, tok, TEXTS[3], prompts["p5"], 9),
                _alone(model, tok, TEXTS[0], None, 7)]
    assert got == expected
    assert [h.result().finish_reason for h in first + later] == ["length"] * 4
    assert [len(h.result().token_ids) for h in first + later] == [12, 4, 9, 7]


def test_stop_strings_and_streamed_deltas_add_up_to_the_output(tiny):
    model, tok, _ = tiny
    _responsive(model)
    prompt = _prompts(model)["p5"]
    engine = Engine(model, tok)
    engine.add_prompt("p", prompt)
    free = _alone(model, tok, TEXTS[0], prompt, 16)
    words = free.split()
    assert len(words) >= 2, free
    stop = words[1][:2]  # a stop string from the middle of the free-running output
    handle = engine.submit("p", TEXTS[0], SamplingParams(max_new_tokens=16, stop=[stop]))
    engine.run_until_idle()
    result = handle.result(timeout=0)
    assert result.text == _alone(model, tok, TEXTS[0], prompt, 16, stop=stop)
    assert result.text == free[:free.lstrip().find(stop)].strip()
    assert result.finish_reason == "stop"
    deltas = []
    while True:
        kind, value = handle.next_event(timeout=0)
        if kind == "done":
            break
        deltas.append(value)
    assert "".join(deltas) == result.text


def test_cancelled_request_leaves_the_batch_and_others_are_unchanged(tiny):
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok)
    keep = engine.submit("p3", TEXTS[5], SamplingParams(max_new_tokens=10))
    drop = engine.submit("p8", TEXTS[1], SamplingParams(max_new_tokens=10))
    engine.step()
    engine.step()
    drop.cancel()
    engine.step()
    assert engine.stats()["running"] == 1
    engine.run_until_idle()
    assert drop.result(timeout=0).finish_reason == "cancelled"
    assert keep.result(timeout=0).text == _alone(model, tok, TEXTS[5], prompts["p3"], 10)


def test_prefix_cache_evicts_least_recently_used_within_its_budget(tiny):
    model, tok, _ = tiny
    prompts = _prompts(model)
    one = build_prompt_cache(model, prompts["p8"], None)
    size = sum(k.numel() * k.element_size() * 2 for k, _ in one.layers)
    engine = Engine(model, tok, prefix_cache_bytes=int(size * 1.5))
    for name, tensor in prompts.items():
        engine.add_prompt(name, tensor)
    for name in ("p8", "p5", "p8", "p3", "p8"):
        engine.generate([TEXTS[0]], [name], SamplingParams(max_new_tokens=2))
    # Budget 1.5 x the largest prefix: p8 alone, or p5 + p3 (smaller), never p8 with another.
    assert engine.prefixes.bytes <= int(size * 1.5)
    assert engine.prefixes.evictions >= 2
    outs = engine.generate([TEXTS[2]] * 3, ["p3", "p5", "p8"], SamplingParams(max_new_tokens=6))
    assert outs == [_alone(model, tok, TEXTS[2], prompts[n], 6) for n in ("p3", "p5", "p8")]


def test_prefix_cache_keys_are_content_hashes():
    a = torch.ones(2, 4)
    assert content_key(a) == content_key(a.clone())
    assert content_key(a) != content_key(torch.ones(4, 2))
    b = a.clone()
    b[1, 3] = 1.0001
    assert content_key(a) != content_key(b)
    cache = PrefixCache(0)
    assert cache.get("k", lambda: None) is None and cache.misses == 1


def test_bad_prompts_and_requests_are_refused_in_one_line(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    h = model.config.hidden_size
    with pytest.raises(SoftPromptError,
                       match=r"prompt 'wide': prompt hidden size 33 does not match .* 32"):
        engine.add_prompt("wide", torch.zeros(3, h + 1))
    with pytest.raises(SoftPromptError, match="non-finite"):
        engine.add_prompt("nan", torch.full((3, h), float("nan")))
    with pytest.raises(SoftPromptError, match="no prompt named 'missing'"):
        engine.submit("missing", "text")
    with pytest.raises(SoftPromptError, match="one prompt per input"):
        engine.generate(["a", "b"], [None])
    engine.add_prompt("gone", torch.zeros(2, h))
    waiting = engine.submit("gone", TEXTS[0])
    engine.remove_prompt("gone")
    engine.run_until_idle()
    assert waiting.result(timeout=0).finish_reason == "error"
    assert "removed" in waiting.result().error


def test_background_thread_serves_concurrent_submitters(tiny):
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok, max_batch_size=4)
    engine.start()
    try:
        names = ["p3", "p5", "p8", None]
        handles = [engine.submit(names[i % 4], TEXTS[i % len(TEXTS)],
                                 SamplingParams(max_new_tokens=5)) for i in range(10)]
        got = [h.result(timeout=60).text for h in handles]
    finally:
        engine.stop()
    assert got == [_alone(model, tok, TEXTS[i % len(TEXTS)], prompts.get(names[i % 4]), 5)
                   for i in range(10)]


@pytest.mark.slow
def test_bundled_model_mixed_batch_equals_each_request_alone():
    from softprompt import models
    from softprompt.tasks import get_task, make_example, render_input

    model, tok = models.load_model("smollm2-135m")
    task = get_task("translation")
    table = model.get_input_embeddings().weight
    # Three prompts of different lengths made of real token embeddings (what text init gives).
    prompts = {f"p{n}": table[tok(text, add_special_tokens=False).input_ids[:n]].detach()
               for n, text in ((4, "Translate into German:"),
                               (7, "Translate the English sentence into German, please."),
                               (11, "You translate English sentences into German. Reply with "
                                    "the German sentence only."))}
    # And a KV prefix (prefix tuning's kind of prompt), the keys/values of an instruction.
    prompts["kv"] = tokens_kv(model, tok("Translate English to German.",
                                         add_special_tokens=False).input_ids)
    engine = Engine(model, tok, max_batch_size=8)
    for name, tensor in prompts.items():
        engine.add_prompt(name, tensor)
    sources = ["A dog runs on the beach.", "Two children play in the park.",
               "The woman is reading a book.", "It is raining in the city."]
    texts = [render_input(task, make_example(task, {"source": s, "target": "-"}))
             for s in sources]
    names = ["p4", "p7", "p11", "kv", None]
    jobs = [(texts[i % 4], names[(i + i // 4) % 5]) for i in range(10)]
    params = SamplingParams(max_new_tokens=12, stop=["\n"])
    outs = engine.generate([t for t, _ in jobs], [n for _, n in jobs], params)
    expected = [_alone(model, tok, t, None if n is None else prompts[n], 12, stop="\n")
                for t, n in jobs]
    assert outs == expected
    assert len(set(outs)) >= 4


def test_unmixed_engine_batches_one_prompt_at_a_time_with_the_same_outputs(tiny):
    model, tok, _ = tiny
    _responsive(model)
    prompts = _prompts(model)
    mixed, single = Engine(model, tok), Engine(model, tok, mixed=False)
    sizes = {True: [], False: []}
    for engine in (mixed, single):
        for name, tensor in prompts.items():
            engine.add_prompt(name, tensor)
        engine.on_step = sizes[engine.mixed].append
    jobs = [(TEXTS[i % 6], ["p3", "p5", "p8"][i % 3]) for i in range(9)]
    params = SamplingParams(max_new_tokens=6)
    outs = [e.generate([t for t, _ in jobs], [n for _, n in jobs], params)
            for e in (mixed, single)]
    assert outs[0] == outs[1]
    assert max(sizes[True]) == 9 and max(sizes[False]) == 3


def test_inputs_beyond_the_model_positions_are_refused_at_submit(tiny):
    model, tok, _ = tiny
    engine = Engine(model, tok)
    engine.add_prompt("p", torch.zeros(8, model.config.hidden_size))
    long_ids = [5] * 500  # + 8 prompt positions + 10 new tokens > 512
    with pytest.raises(SoftPromptError, match=r"needs 51\d positions but the model has 512"):
        engine.submit("p", long_ids, SamplingParams(max_new_tokens=10))
    with pytest.raises(SoftPromptError, match="is empty"):
        engine.submit("p", [])
    assert engine.stats()["waiting"] == 0


def test_prompt_pool_mixes_tasks_and_matches_each_prompt_alone(tiny, tmp_path):
    """The Python API: prompt directories of two tasks, one batch, outputs as if alone."""
    from softprompt import api
    from softprompt.prompt import PromptMeta, save_prompt
    from softprompt.tasks import get_task, input_example

    model, tok, _ = tiny
    _responsive(model)
    h = model.config.hidden_size
    tasks = {"de": get_task("translation"), "qa": get_task("qa")}
    tensors = {}
    for n, (name, task) in enumerate(tasks.items()):
        tensors[name] = torch.randn(4 + 3 * n, h, generator=torch.Generator().manual_seed(n))
        save_prompt(tmp_path / name, tensors[name],
                    PromptMeta(model="tiny", task=task.to_dict(), num_virtual_tokens=4 + 3 * n,
                               hidden_size=h))
    pool = api.load_prompts([tmp_path / "de", tmp_path / "qa"], loaded=(model, tok))
    qa_record = {"context": "The cat sat on the mat.", "question": "Where is the cat?"}
    items = ["A dog runs on the beach.", qa_record, "Rain.", dict(qa_record, question="Who?")]
    names = ["de", "qa", "de", "qa"]
    outs = pool.generate(items, names, max_new_tokens=8)
    for item, name, out in zip(items, names, outs):
        pm = api.PromptedModel(model, tok, tensors[name], tasks[name], "tiny")
        assert out == pm.generate(item, max_new_tokens=8)
    assert input_example(tasks["qa"], qa_record).fields["question"] == "Where is the cat?"
    with pytest.raises(SoftPromptError, match="field 'source' is empty"):
        pool.generate(["  "], ["de"])  # plain text is checked as a record's field is
    with pytest.raises(SoftPromptError, match=r"unknown prompt\(s\) \['fr'\]"):
        pool.generate(["x"], ["fr"])


def test_finished_rows_leave_the_cache_together_once_a_quarter_is_done(tiny):
    """Leaving copies every layer's cache, so finished rows stay (ignored) until a quarter of
    the batch is done; outputs are unaffected."""
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok)
    names = ["p3", "p5", "p8", "p3", "p5", "p8", "p3", "p5"]
    handles = [engine.submit(names[i], TEXTS[i % 6], SamplingParams(max_new_tokens=i + 1))
               for i in range(8)]
    engine.step()  # prefill: the first token of every row; the 1-token request is done
    assert (len(engine._rows), engine.stats()["running"]) == (8, 7)
    engine.step()  # the 2-token request is done too: 2 of 8, so both leave
    assert (len(engine._rows), engine.stats()["running"]) == (6, 6)
    engine.run_until_idle()
    assert engine._cache is None and engine._rows == []
    for i, h in enumerate(handles):
        assert h.result(timeout=0).text == _alone(model, tok, TEXTS[i % 6], prompts[names[i]],
                                                  i + 1)


def test_decoding_controls_apply_per_row_as_in_generate(tiny):
    """Rows with different controls (and none) share the batch; each equals generate() with
    its own settings, which tests/test_decoding.py compares with transformers."""
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok)
    settings = [{}, {"repetition_penalty": 1.6}, {"no_repeat_ngram_size": 2,
                                                  "repetition_penalty": 0.6},
                {"min_new_tokens": 5, "repetition_penalty": 1.2},
                {"repetition_penalty": 0.6, "no_repeat_ngram_size": 2,
                 "penalize_output_only": True}]
    jobs = [(TEXTS[i], ["p3", "p5", "p8", None, "p3"][i], settings[i]) for i in range(5)]
    handles = [engine.submit(name, text, SamplingParams(max_new_tokens=10, **opts))
               for text, name, opts in jobs]
    engine.run_until_idle()
    for (text, name, opts), handle in zip(jobs, handles):
        expected = generate(model, tok, [text], prompts.get(name),
                            GenerationConfig(max_new_tokens=10, **opts))[0]
        assert handle.result(timeout=0).text == expected
        if opts:  # the control changed this row's output
            assert expected != _alone(model, tok, text, prompts.get(name), 10)


def test_beam_request_runs_alone_between_steps_and_equals_generate(tiny):
    model, tok, _ = tiny
    engine, prompts = _engine(model, tok)
    greedy = engine.submit("p3", TEXTS[0], SamplingParams(max_new_tokens=10))
    engine.step()  # the greedy request is decoding
    beam = engine.submit("p5", TEXTS[1], SamplingParams(max_new_tokens=10, num_beams=3))
    engine.step()  # one decoding step, then the beam request, searched to the end
    assert beam.done and not greedy.done
    engine.run_until_idle()
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3)
    expected = generate(model, tok, [TEXTS[1]], prompts["p5"], cfg)[0]
    assert beam.result(timeout=0).text == expected
    assert expected != _alone(model, tok, TEXTS[1], prompts["p5"], 10)
    assert greedy.result(timeout=0).text == _alone(model, tok, TEXTS[0], prompts["p3"], 10)
    events = []
    while True:
        kind, value = beam.next_event(timeout=0)
        events.append(kind)
        if kind == "done":
            break
    assert events == ["delta", "done"]


@pytest.mark.parametrize("options, message", [
    ({"repetition_penalty": -1.0}, "repetition_penalty must be positive"),
    ({"min_new_tokens": -1}, "min_new_tokens must be zero (off) or a positive integer"),
    ({"num_beams": 2, "temperature": 0.5}, "num_beams 2 searches deterministically"),
])
def test_bad_decoding_controls_are_refused(options, message):
    with pytest.raises(SoftPromptError) as err:
        SamplingParams(**options)
    assert str(err.value).startswith(message)
