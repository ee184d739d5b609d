"""Few-shot hard prompts: demonstrations drawn from the training split with a fixed seed,
rendered with the task's template + target, as many as fit; the model sees exactly that text."""

from __future__ import annotations

import json

import pytest

from softprompt.config import GenerationConfig
from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.evaluation import (
    System,
    _encode_shots,
    evaluate,
    few_shot_baselines,
    few_shot_system,
)
from softprompt.generation import cut_at_stop
from softprompt.tasks import get_task, make_examples, render_input


def _records(samples, task: str, split: str, limit: int | None = None) -> list[dict]:
    return read_records(samples / task / f"{split}.jsonl", limit=limit)


def test_demonstrations_come_from_the_training_records_with_a_fixed_seed(samples):
    task = get_task("translation")
    train, test = _records(samples, "translation", "train"), _records(samples, "translation",
                                                                       "test")
    system = few_shot_system(task, "hard, 3-shot", train, 3, seed=0, instruction="Translate.")
    solved = {f"{render_input(task, ex)} {ex.target}" for ex in make_examples(task, train)}
    assert len(system.demonstrations) == 3 and set(system.demonstrations) <= solved
    test_inputs = {render_input(task, ex) for ex in make_examples(task, test)}
    assert not any(d.rsplit("\nGerman:", 1)[0] + "\nGerman:" in test_inputs
                   for d in system.demonstrations)
    again = few_shot_system(task, "x", train, 3, seed=0)
    other = few_shot_system(task, "x", train, 3, seed=1)
    assert again.demonstrations == system.demonstrations
    assert other.demonstrations != system.demonstrations
    assert system.demonstrations[0].startswith("English: ")
    assert "\nGerman: " in system.demonstrations[0]
    with pytest.raises(SoftPromptError, match="--shots 200 needs 200 training records"):
        few_shot_system(task, "x", train, 200)


def test_few_shot_baselines_use_our_instruction_per_k_and_the_chat_template_when_asked(samples):
    task = get_task("qa")
    train = _records(samples, "qa", "train")
    systems = few_shot_baselines(task, train, [0, 1, 3], seed=0, chat=True)
    assert [s.name for s in systems] == ["hard: ours, 1-shot", "hard: ours, 1-shot (chat)",
                                         "hard: ours, 3-shot", "hard: ours, 3-shot (chat)"]
    assert all(s.instruction == task.better_instruction for s in systems)
    assert [s.chat for s in systems] == [False, True, False, True]
    assert [len(s.demonstrations) for s in systems] == [1, 1, 3, 3]


def test_the_model_sees_instruction_demonstrations_and_input_and_answers_like_generate(tiny,
                                                                                      samples):
    """A few-shot system's predictions are the plain model's greedy continuation of exactly
    ``instruction \\n demo \\n\\n demo \\n\\n input``."""
    model, tok, _ = tiny
    task = get_task("translation")
    train, test = _records(samples, "translation", "train"), _records(samples, "translation",
                                                                       "test", limit=3)
    system = few_shot_system(task, "hard, 2-shot", train, 2, seed=4, instruction="Translate.")
    d1, d2 = system.demonstrations
    result = evaluate(model, tok, task, test, system,
                      generation=GenerationConfig(max_new_tokens=5, batch_size=2))
    assert result.metrics["shots"] == 2 and result.metrics["shots_mean"] == 2.0
    assert result.metrics["shots_all_rate"] == 100.0
    for ex, row in zip(make_examples(task, test), result.predictions):
        text = f"Translate.\n{d1}\n\n{d2}\n\n{render_input(task, ex)}"
        assert row["input"] == text and row["shots"] == 2
        ids = tok(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        reply = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        assert row["prediction"] == cut_at_stop(reply, task.stop)[0]


def test_as_many_demonstrations_as_fit_and_none_before_an_input_that_is_cut(tiny, samples):
    _, tok, _ = tiny
    task = get_task("summarization")
    train, test = _records(samples, "summarization", "train"), _records(
        samples, "summarization", "test", limit=1)
    system = few_shot_system(task, "3-shot", train, 3, seed=0)
    ex = make_examples(task, test)
    lengths = []
    for k in range(4):
        sub = System("k", demonstrations=system.demonstrations[:k])
        enc, counts = _encode_shots(task, ex, tok, sub, 100_000, with_target=False)
        assert counts == [k]
        lengths.append(len(enc[0].input_ids))
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    reserve = 7
    # Room for the input and one or two demonstrations: the second one just does not fit.
    context = lengths[2] + reserve - 1
    enc, counts = _encode_shots(task, ex, tok, system, lengths[0] + reserve, with_target=False,
                                reserve=reserve, context=context)
    assert counts == [1] and len(enc[0].input_ids) == lengths[1] and not enc[0].truncated
    # An input that must itself be cut to --max-length gets no demonstrations.
    enc, counts = _encode_shots(task, ex, tok, system, lengths[0] + reserve - 5,
                                with_target=False, reserve=reserve, context=100_000)
    assert counts == [0] and enc[0].truncated


def _cli(argv: list[str]) -> int:
    from softprompt.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_cli_evaluate_hard_with_shots(tiny_dirs, samples, tmp_path, capsys):
    train = str(samples / "qa" / "train.jsonl")
    common = ["evaluate", "--task", "qa", "--test", str(samples / "qa" / "test.jsonl"),
              "--model", str(tiny_dirs["llama"]), "--limit", "2", "--max-new-tokens", "3",
              "--quiet"]
    assert _cli([*common, "--hard", "Answer:", "--shots", "2", "--shots-seed", "5", "--train",
                 train, "--output", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["system"] == "hard, 2-shot" and metrics["shots"] == 2
    rows = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text()
            .splitlines()]
    demos = few_shot_system(get_task("qa"), "x", read_records(train), 2, seed=5).demonstrations
    assert all(r["shots"] == 2 for r in rows)
    assert rows[0]["input"].startswith(f"Answer:\n{demos[0]}\n\n{demos[1]}\n\nContext: ")
    capsys.readouterr()
    assert _cli([*common, "--no-instruction", "--shots", "1", "--output",
                 str(tmp_path / "f")]) == 2
    assert "give --train PATH" in capsys.readouterr().err
    assert _cli([*common, "--no-instruction", "--shots", "-1", "--train", train, "--output",
                 str(tmp_path / "f")]) == 2
    assert "--shots and --shots-seed must be zero or positive" in capsys.readouterr().err


def test_with_the_chat_template_the_whole_few_shot_text_is_one_user_turn(tiny, samples):
    _, tok, _ = tiny
    tok.chat_template = ("{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    task = get_task("translation")
    train, test = _records(samples, "translation", "train"), _records(samples, "translation",
                                                                       "test", limit=2)
    system = few_shot_system(task, "chat", train, 2, seed=1, instruction="Translate.",
                             chat=True)
    d1, d2 = system.demonstrations
    encoded, counts = _encode_shots(task, make_examples(task, test), tok, system, 512,
                                    with_target=False)
    assert counts == [2, 2]
    for ex, enc in zip(make_examples(task, test), encoded):
        text = (f"<s>user: Translate.\n{d1}\n\n{d2}\n\n{render_input(task, ex)}</s>"
                "<s>assistant:")
        assert enc.input_ids == tok(text, add_special_tokens=False).input_ids
