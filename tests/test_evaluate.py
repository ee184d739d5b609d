"""evaluate and compare end to end on tiny models; the no-instruction baseline is the plain
model's own greedy generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from softprompt.comparison import SOFT, compare, summary
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.evaluation import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    System,
    baselines,
    evaluate,
    write_eval,
)
from softprompt.generation import cut_at_stop
from softprompt.tasks import get_task, make_examples, render_input

PNG = b"\x89PNG\r\n\x1a\n"


def test_no_instruction_equals_plain_model_generate(tiny, samples):
    model, tok, _ = tiny
    task = get_task("translation")
    records = read_records(samples / "translation" / "test.jsonl", limit=5)
    gen = GenerationConfig(max_new_tokens=8, batch_size=2)
    result = evaluate(model, tok, task, records, System("no instruction"), generation=gen)
    for ex, row in zip(make_examples(task, records), result.predictions):
        ids = tok(render_input(task, ex), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        assert row["prediction"] == cut_at_stop(text, task.stop)[0]


def test_hard_prompt_puts_the_instruction_in_front(tiny, samples):
    model, tok, _ = tiny
    task = get_task("translation")
    records = read_records(samples / "translation" / "test.jsonl", limit=2)
    result = evaluate(model, tok, task, records, System("hard", instruction="Translate now:"),
                      generation=GenerationConfig(max_new_tokens=4))
    assert all(r["input"].startswith("Translate now:\nEnglish: ") for r in result.predictions)


@pytest.mark.parametrize("task_name, keys", [
    ("translation", {"bleu", "chrf", "token_overlap"}),
    ("qa", {"exact_match", "f1", "token_overlap"}),
    ("summarization", {"rouge1", "rouge2", "rougeL", "token_overlap"}),
])
def test_evaluate_writes_predictions_and_flat_metrics(tiny_dirs, samples, tmp_path, task_name,
                                                      keys):
    from softprompt.models import load_model

    model, tok = load_model(str(tiny_dirs["gpt2"]))
    task = get_task(task_name)
    records = read_records(samples / task_name / "test.jsonl", limit=4)
    prompt = torch.randn(3, model.config.hidden_size) * 0.1
    result = evaluate(model, tok, task, records, System(SOFT, prompt),
                      generation=GenerationConfig(max_new_tokens=5), max_length=512)
    write_eval(tmp_path, result)
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert keys | {"loss", "perplexity", "n", "empty_rate", "seconds", "examples_per_s"} <= set(
        metrics)
    assert metrics["n"] == 4
    for key in keys | {"empty_rate"}:
        assert 0.0 <= metrics[key] <= 100.0 + 1e-9, key
    assert metrics["loss"] > 0 and math.isclose(metrics["perplexity"], math.exp(metrics["loss"]),
                                                rel_tol=1e-3)
    rows = [json.loads(x) for x in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(set(r) >= {"id", "prediction", "references", "scores"} for r in rows)
    if task_name == "qa":
        assert rows[0]["references"] == records[0]["answers"]


def test_baselines_include_study_ours_user_and_none():
    task = get_task("qa")
    names = [s.name for s in baselines(task, ["Be brief."])]
    assert names == ["hard: study", "hard: ours", "hard: user", "no instruction"]
    assert baselines(task)[0].instruction == "Answer the Following Question"


def test_compare_end_to_end_writes_report_and_plots(tiny_dirs, samples, tmp_path):
    task = get_task("translation")
    out = tmp_path / "cmp"
    comps = compare(task, str(samples / "translation" / "train.jsonl"),
                    str(samples / "translation" / "test.jsonl"), out,
                    validation_path=str(samples / "translation" / "test.jsonl"),
                    model_names=[str(tiny_dirs["gpt2"]), str(tiny_dirs["llama"])], limit=4,
                    val_limit=3, generation=GenerationConfig(max_new_tokens=4),
                    prompt_config=PromptConfig(num_virtual_tokens=3),
                    train_config=TrainConfig(epochs=2, batch_size=8, max_train_examples=16,
                                             max_eval_examples=4),
                    hard=["Please translate:"], progress=False)
    assert len(comps) == 2
    for comp in comps:
        assert list(comp.systems) == [SOFT, "hard: study", "hard: ours", "hard: user",
                                      "no instruction", "hard: ours, 3-shot"]
        assert [r["epoch"] for r in comp.train_log if r["event"] == "epoch"] == [1, 2]
        assert all("val_chrf" in r for r in comp.train_log if r["event"] == "epoch")
    report = (out / "report.md").read_text()
    assert "| system |" in report and "hard: study" in report and "Sample outputs" in report
    images = sorted(p.name for p in out.glob("*.png"))
    # per model: intervals, bars, loss, val
    assert "scaling.png" in images and len(images) == 1 + 2 * 4
    for name in images:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    for name in images:
        assert f"({name})" in report
    assert (out / "report.html").read_text().count("<img") == len(images)
    data = json.loads((out / "comparison.json").read_text())
    assert [m["model"] for m in data["models"]] == [str(tiny_dirs["gpt2"]),
                                                   str(tiny_dirs["llama"])]
    assert "soft prompt" in summary(comps)


def test_compare_refuses_existing_report(tiny_dirs, samples, tmp_path):
    from softprompt.errors import SoftPromptError

    (tmp_path / "report.md").write_text("old")
    with pytest.raises(SoftPromptError, match="already holds a report"):
        compare(get_task("translation"), str(samples / "translation" / "train.jsonl"),
                str(samples / "translation" / "test.jsonl"), tmp_path,
                model_names=[str(tiny_dirs["gpt2"])])
    assert (tmp_path / "report.md").read_text() == "old"


def _cli(argv: list[str]) -> int:
    from softprompt.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_cli_evaluate_and_compare(tiny_dirs, samples, tmp_path, capsys):
    model = str(tiny_dirs["llama"])
    test = str(samples / "qa" / "test.jsonl")
    common = ["--test", test, "--model", model, "--limit", "3", "--max-new-tokens", "4",
              "--quiet"]
    assert _cli(["evaluate", "--task", "qa", "--hard", "Answer:", "--output",
                 str(tmp_path / "hard"), *common]) == 0
    hard = json.loads((tmp_path / "hard" / METRICS_FILE).read_text())
    assert hard["system"] == "hard" and hard["n"] == 3 and "f1" in hard
    assert _cli(["evaluate", "--task", "qa", "--no-instruction", "--output",
                 str(tmp_path / "hard"), *common]) == 2  # refuses to overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert _cli(["compare", "--task", "qa", "--train", str(samples / "qa" / "train.jsonl"),
                 "--output", str(tmp_path / "cmp"), "--epochs", "1", "--max-train-examples",
                 "8", "--num-virtual-tokens", "2", "--models", model, *common]) == 0
    out = capsys.readouterr().out
    assert "| soft prompt |" in out and "report.md" in out
    prompt_dir = tmp_path / "cmp" / "prompt"
    assert _cli(["evaluate", "--prompt", str(prompt_dir), "--output", str(tmp_path / "soft"),
                 *common]) == 0
    soft = json.loads((tmp_path / "soft" / METRICS_FILE).read_text())
    assert soft["system"] == "soft prompt" and soft["n"] == 3
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert table["models"][0]["systems"][SOFT]["f1"] == soft["f1"]


def test_chat_baseline_wraps_instruction_and_input_in_the_chat_template(tiny, samples):
    """The chat system's model input is exactly the chat template's text, and its predictions
    are the plain model's own greedy continuation of that text."""
    from softprompt.evaluation import _encode

    model, tok, _ = tiny
    tok.chat_template = ("{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    task = get_task("translation")
    records = read_records(samples / "translation" / "test.jsonl", limit=3)
    examples = make_examples(task, records)
    system = System("hard: ours (chat)", instruction="Translate.", chat=True)
    texts = [f"<s>user: Translate.\n{render_input(task, ex)}</s><s>assistant:"
             for ex in examples]
    encoded = _encode(task, examples, tok, system, 512, with_target=False)
    assert [e.input_ids for e in encoded] == [tok(t, add_special_tokens=False).input_ids
                                             for t in texts]
    assert [s.name for s in baselines(task, chat=True)] == [
        "hard: study", "hard: ours", "hard: ours (chat)", "no instruction"]
    gen = GenerationConfig(max_new_tokens=6, batch_size=2)
    result = evaluate(model, tok, task, records, system, generation=gen)
    for text, row in zip(texts, result.predictions):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        reply = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        assert row["prediction"] == cut_at_stop(reply, task.stop)[0]
    # The loss is teacher-forced on the same chat text followed directly (the assistant's
    # turn) by the target and EOS.
    scored = _encode(task, examples, tok, system, 512, with_target=True)
    total, count = 0.0, 0
    for text, ex, enc in zip(texts, examples, scored):
        whole = tok(text + ex.target, add_special_tokens=False).input_ids
        assert enc.input_ids == tok(text, add_special_tokens=False).input_ids
        assert whole[:len(enc.input_ids)] == enc.input_ids
        target = whole[len(enc.input_ids):] + [tok.eos_token_id]
        assert enc.target_ids == target
        ids = torch.tensor([enc.input_ids + target])
        logits = model(ids).logits[0, len(enc.input_ids) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(target),
                                                   reduction="sum").item()
        count += len(target)
    assert math.isclose(result.metrics["loss"], total / count, abs_tol=1e-3)


def test_compare_reuse_keeps_finished_evaluations(tiny_dirs, samples, tmp_path):
    task = get_task("translation")
    kwargs = dict(model_names=[str(tiny_dirs["gpt2"])], limit=3,
                  generation=GenerationConfig(max_new_tokens=3),
                  prompt_config=PromptConfig(num_virtual_tokens=2),
                  train_config=TrainConfig(epochs=1, max_train_examples=8), progress=False)
    out = tmp_path / "cmp"
    compare(task, str(samples / "translation" / "train.jsonl"),
            str(samples / "translation" / "test.jsonl"), out, **kwargs)
    marker = out / "systems" / "hard_study" / "metrics.json"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "chrf": 77.7}))
    (out / "systems" / "no_instruction" / "metrics.json").unlink()  # as if interrupted
    comps = compare(task, None, str(samples / "translation" / "test.jsonl"), out,
                    prompt_dir=str(out / "prompt"), reuse=True, **kwargs)
    assert comps[0].systems["hard: study"]["chrf"] == 77.7  # kept, not re-run
    assert (out / "systems" / "no_instruction" / "metrics.json").is_file()  # re-run
    assert comps[0].train_log  # read back from the prompt directory for the plots
