"""bench/results.py, the one script behind RESULTS.md: its plan fits the time budget, and a
whole run on the tiny model and the sample data writes every section from its own files."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def results():
    sys.path.insert(0, str(BENCH))
    import results

    return results


def test_the_default_plan_fits_three_hours_and_a_smaller_budget_cuts_training_sets(results):
    full = results.make_plan(results.parse_args([]))
    assert full.tasks == ["summarization", "qa", "translation"]
    assert full.methods == ["prompt", "prefix"]
    assert full.seeds == [0, 1, 2] and full.shots == [0, 3] and full.test_examples == 100
    assert 0.8 * 3 * 3600 < full.estimate_seconds <= 3 * 3600
    assert any(c == "methods: ptuning, residual not run (--methods prompt,prefix)"
               for c in full.cuts)
    plan = results.make_plan(results.parse_args(["--budget-hours", "2"]))
    assert plan.estimate_seconds <= 2 * 3600
    assert all(100 <= n < results.SETTINGS[t]["train_examples"]
               for t, n in plan.train_examples.items())
    assert plan.curve_task == "translation"
    assert plan.curve_sizes == [50, 200, plan.train_examples["translation"]]
    assert any(c.startswith("training sets: summarization") for c in plan.cuts)
    # More methods: smaller training sets, and a plan over budget says so.
    four = results.make_plan(results.parse_args(["--methods", "prompt,ptuning,residual,prefix"]))
    assert all(n <= plan.train_examples[t] for t, n in four.train_examples.items())
    assert (four.estimate_seconds <= 3 * 3600) != any("over budget" in c for c in four.cuts)
    fixed = results.make_plan(results.parse_args(["--train-limit", "300"]))
    assert set(fixed.train_examples.values()) == {300}
    assert not any(c.startswith("training sets") for c in fixed.cuts)


def test_train_minutes_sizes_each_training_set_then_its_epochs_to_the_minutes(results):
    plan = results.make_plan(results.parse_args(["--methods", "prefix", "--seeds", "0",
                                                 "--train-minutes", "20"]))
    share = 20 * 60 * results.TRAIN_MINUTES_SHARE

    def seconds(task, n, epochs):
        t = results.TIMINGS[task]["train"]
        return epochs * (n * t + plan.val_loss_limit * t * results.VALIDATION_COST)

    for task in plan.tasks:
        # As many examples as fit, in the task's own epochs, when the split is large enough.
        n, epochs = results.train_examples_for(task, 20, plan, available=10**6)
        assert epochs == plan.epochs[task] and n > results.SETTINGS[task]["train_examples"]
        assert share - seconds(task, 10, epochs) <= seconds(task, n, epochs) <= share, task
        # A split that runs out first: all of it, for as many epochs as fit (at least the
        # task's own), unless the epochs were given.
        n, more = results.train_examples_for(task, 20, plan, available=300)
        assert n == 300 and more >= epochs
        assert seconds(task, 300, more) <= share < seconds(task, 300, more + 1), task
        assert results.train_examples_for(task, 20, plan, 300, fixed_epochs=True) == (300,
                                                                                     epochs)
    # The plan reads the splits' sizes: ../shared/data has 2000 training examples per task,
    # and translation (the cheapest per example) gets the epochs that fill its minutes.
    assert plan.train_examples == {t: results._split_size(t) for t in plan.tasks}
    assert plan.epochs["translation"] > results.SETTINGS["translation"]["epochs"]
    assert "--train-minutes 20" in results._command(results.parse_args(["--train-minutes", "20"]))
    with pytest.raises(SystemExit, match="give one"):
        results.make_plan(results.parse_args(["--train-minutes", "20", "--train-limit", "300"]))


def test_lr_takes_method_rate_pairs_and_refuses_anything_else(results):
    plan = results.make_plan(results.parse_args(["--lr", "prefix=0.03,prompt=0.1"]))
    assert plan.lr == {"prefix": 0.03, "prompt": 0.1}
    for bad, match in (("prefix", "METHOD=LR pairs"), ("prefix=fast", "METHOD=LR pairs"),
                       ("lora=0.1", "unknown method")):
        with pytest.raises(SystemExit, match=match):
            results.make_plan(results.parse_args(["--lr", bad]))


def test_an_unknown_method_is_refused_before_any_work(results):
    with pytest.raises(SystemExit, match=r"unknown method\(s\) lora; --methods takes a "
                                         r"comma-separated subset of prompt,ptuning,residual"):
        results.make_plan(results.parse_args(["--methods", "prompt,lora", "--plan"]))
    assert results.make_plan(results.parse_args(["--methods", "residual"])).methods == [
        "residual"]


def test_a_tiny_run_writes_results_md_with_seeds_shots_margins_and_curve(results, tiny_dirs,
                                                                        samples, tmp_path,
                                                                        monkeypatch):
    data = tmp_path / "data"
    for task in ("summarization", "qa", "translation"):
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(samples / task / f"{split}.jsonl", data / task / f"{split}.jsonl")
        shutil.copy(samples / task / "test.jsonl", data / task / "validation.jsonl")
    monkeypatch.setattr(results, "DATA", data)
    out, md = tmp_path / "out", tmp_path / "doc" / "RESULTS.md"
    md.parent.mkdir()
    argv = ["--model", str(tiny_dirs["gpt2"]), "--limit", "3", "--train-limit", "8",
            "--epochs", "1", "--methods", "prompt,prefix", "--seeds", "0,1", "--shots", "0,1",
            "--curve-sizes", "4",
            "--val-limit", "2", "--val-loss-limit", "3", "--out", str(out), "--output",
            str(md), "--quiet"]
    results.main(argv)
    text = md.read_text()
    run = json.loads((out / "run.json").read_text())
    # --methods prompt,prefix is the default, so the command leaves it out.
    assert run["command"].startswith("python bench/results.py "
                                     "--seeds 0,1 --shots 0,1 "
                                     "--limit 3 --train-limit 8 --epochs 1")
    for item in (run["command"], run["commit"], run["machine"], run["date"], "Total time"):
        assert item in text
    assert "## What was cut to fit the budget" in text and "first 3 of each test split" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    for task in ("summarization", "qa", "translation"):
        assert f"| {task} | " in summary
    assert text.count("| soft prompt (prompt) | ") == 3 and " ± " in text
    assert text.count("| soft prompt (prefix) | ") == 3
    # Every method's row names what it trained: P x H = 20 x 32 for the prompt, a key and a
    # value of 2 heads x 16 per layer, 2 layers, 20 slots for the prefix.
    rows = {line.split(" | ")[2].rstrip(" *"): line for line in summary.splitlines()
            if line.startswith("| translation | ")}
    assert rows["prompt"].endswith(" | 640 |") and rows["prefix"].endswith(" | 2,560 |")
    assert "hard: ours, 1-shot" in text and "demonstrations fitted per example" in text
    assert "95% CI [" in text and "## What we found" in text
    assert "![learning curve](results/learning_curve_translation.png)" in text
    assert (md.parent / "results" / "learning_curve_translation.png").stat().st_size > 1000
    result = json.loads((out / "translation" / "result.json").read_text())
    assert [p["train_examples"] for p in result["methods"]["prompt"]["curve"]] == [4, 8]
    # Each task's method with the lower validation loss is marked, as its softprompt.json
    # files say.
    for task in ("summarization", "qa", "translation"):
        val = {m: results._validation_loss(out / task / m) for m in ("prompt", "prefix")}
        chosen = min(val, key=val.get)
        row = next(line for line in summary.splitlines() if line.startswith(f"| {task} | ")
                   and f" | {chosen} * | " in line)
        assert f" | {val[chosen]:.3f} | " in row
    assert summary.count(" * | ") == 3
    # --report-only rewrites the same file from the run's files alone.
    first = text.split("(this file written")[1].split("\n", 1)[1]
    md.unlink()
    results.main(["--report-only", "--out", str(out), "--output", str(md)])
    assert md.read_text().split("(this file written")[1].split("\n", 1)[1] == first
    # A further run (one method, one seed) takes the hard prompts' evaluations from the first
    # instead of repeating them, and --also gives it a section of its own.
    out2 = tmp_path / "out2"
    results.main(["--model", str(tiny_dirs["gpt2"]), "--limit", "3", "--train-limit", "8",
                  "--epochs", "1", "--methods", "prefix", "--seeds", "0", "--shots", "0,1",
                  "--curve-task", "none", "--val-limit", "2", "--val-loss-limit", "3",
                  "--lr", "prefix=0.05",
                  "--out", str(out2), "--output", str(tmp_path / "doc" / "further.md"),
                  "--hard-from", str(out), "--quiet"])
    hard = results._hard_systems(out2 / "qa" / "prefix")
    assert hard and hard == results._hard_systems(out / "qa" / "prompt")
    for name in hard:  # copied, not evaluated again: a repeat would time itself anew
        assert ((out2 / "qa" / "prefix" / "systems" / name / "metrics.json").read_bytes()
                == (out / "qa" / "prompt" / "systems" / name / "metrics.json").read_bytes())
    results.main(["--report-only", "--out", str(out), "--output", str(md), "--also", str(out2)])
    further = md.read_text().split("## Further run 1: prefix, one training seed (0)")[1]
    assert json.loads((out2 / "run.json").read_text())["command"] in further
    assert (f"evaluations of summarization, qa, translation are the main run's (commit "
            f"{run['commit']}: identical predictions") in further
    assert further.count(" | prefix | ") == 3
    # --lr reached the trainer, and the reports say the rate each method trained with.
    assert json.loads((out2 / "qa" / "prefix" / "comparison.json").read_text())["settings"][
        "lr"] == 0.05
    assert "--lr prefix=0.05" in json.loads((out2 / "run.json").read_text())["command"]
    assert "learning rate prefix 0.05, " in (tmp_path / "doc" / "further.md").read_text()
    assert "; learning rate prefix 0.05; " in further
    assert "learning rate prompt 0.03, prefix 0.01, " in text
    with pytest.raises(SystemExit, match="--hard-from: no evaluations in"):
        results.main(["--model", str(tiny_dirs["gpt2"]), "--tasks", "qa", "--limit", "3",
                      "--out", str(tmp_path / "out3"), "--hard-from", str(tmp_path / "none"),
                      "--output", str(tmp_path / "doc" / "x.md"), "--quiet"])
