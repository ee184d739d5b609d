"""compare as a study on a tiny model: several seeds (mean ± std), K-shot baselines, paired
bootstrap intervals, a learning curve, and a readable report.html checked in headless
Chromium (Debian's package driven by Playwright, as tests/test_playground.py does)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from softprompt.comparison import SOFT, compare, summary
from softprompt.config import GenerationConfig, PromptConfig, TrainConfig
from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.stats import paired_bootstrap, rows_score
from softprompt.tasks import get_task, make_examples, render_input

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
PNG = b"\x89PNG\r\n\x1a\n"
HARD = ["hard: study", "hard: ours", "no instruction", "hard: ours, 2-shot"]


def _study(tiny_dirs, samples, out: Path, **overrides):
    task = get_task("qa")
    kwargs = dict(validation_path=str(samples / "qa" / "test.jsonl"),
                  model_names=[str(tiny_dirs["gpt2"])], limit=6, val_limit=2,
                  generation=GenerationConfig(max_new_tokens=4),
                  prompt_config=PromptConfig(num_virtual_tokens=2, init="vocab"),
                  train_config=TrainConfig(epochs=1, batch_size=4, max_train_examples=12,
                                           max_eval_examples=4),
                  shots=[0, 2], seeds=[0, 1], train_sizes=[4, 12], progress=False)
    return compare(task, str(samples / "qa" / "train.jsonl"), str(samples / "qa" / "test.jsonl"),
                   out, **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def study(tiny_dirs, tmp_path_factory):
    samples = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
    out = tmp_path_factory.mktemp("study") / "cmp"
    return _study(tiny_dirs, samples, out)[0], out


def _eval(directory: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((directory / "metrics.json").read_text())
    rows = [json.loads(x) for x in (directory / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows


def test_one_prompt_per_seed_and_the_soft_row_is_their_mean_and_std(study):
    comp, out = study
    assert list(comp.systems) == [SOFT, *HARD]
    per_seed = [_eval(out / "systems" / f"soft_prompt-seed{s}")[0] for s in (0, 1)]
    prompts = [load_file(out / f"prompt-seed{s}" / "prompt.safetensors")["prompt_embeddings"]
               for s in (0, 1)]
    assert not prompts[0].equal(prompts[1])  # two trainings, not one reported twice
    for key in ("f1", "exact_match", "loss"):
        values = [m[key] for m in per_seed]
        assert comp.systems[SOFT][key] == pytest.approx(statistics.fmean(values), abs=1e-4)
        assert comp.spread[SOFT][key] == pytest.approx(statistics.stdev(values), abs=1e-4)
    assert comp.seeds == [0, 1] and [m["seed"] for m in comp.seed_metrics] == [0, 1]
    assert set(comp.spread) == {SOFT}  # hard prompts are deterministic: no spread
    few = comp.systems["hard: ours, 2-shot"]
    assert few["shots"] == 2 and 0 <= few["shots_mean"] <= 2
    # The demonstrations are solved training examples, never test ones.
    task, samples = get_task("qa"), Path(__file__).resolve().parents[1] / "src/softprompt/samples"
    solved = {f"{render_input(task, ex)} {ex.target}"
              for ex in make_examples(task, read_records(samples / "qa" / "train.jsonl"))}
    tests = {render_input(task, ex)
             for ex in make_examples(task, read_records(samples / "qa" / "test.jsonl"))}
    for row in _eval(out / "systems" / "hard_ours_2-shot")[1]:
        demos = row["input"].split("\n", 1)[1].split("\n\n")[:-1]
        assert len(demos) == row["shots"] and set(demos) <= solved
        assert not any(d.rsplit(" ", 1)[0] in tests for d in demos)
    assert not (out / "prompt").exists()


def test_intervals_pair_the_mean_soft_prompt_with_every_hard_prompt(study):
    comp, out = study
    assert [i["system"] for i in comp.intervals] == HARD
    best = max(HARD, key=lambda n: comp.systems[n]["f1"])
    assert [i["system"] for i in comp.intervals if i["best"]] == [best]
    soft_rows = [_eval(out / "systems" / f"soft_prompt-seed{s}")[1] for s in (0, 1)]
    hard_rows = _eval(out / "systems" / "hard_ours_2-shot")[1]
    soft_f1 = np.array([[r["scores"]["f1"] for r in rows] for rows in soft_rows]).mean(0)
    hard_f1 = np.array([r["scores"]["f1"] for r in hard_rows])
    ci = next(i for i in comp.intervals if i["system"] == "hard: ours, 2-shot")
    assert ci["estimate"] == pytest.approx(float((soft_f1 - hard_f1).mean()))
    # The same resamples as the stats module's, on the per-example differences by hand.
    by_hand = paired_bootstrap(lambda idx: float(soft_f1[idx].mean()),
                               rows_score("f1", hard_rows), len(hard_rows))
    assert (ci["low"], ci["high"]) == pytest.approx((by_hand.low, by_hand.high))
    assert ci["significant"] == (not ci["low"] <= 0 <= ci["high"])
    assert ci["resamples"] == 1000 and ci["level"] == 0.95
    assert "soft prompt - " in summary([comp]) and "CI [" in summary([comp])


def test_learning_curve_trains_each_size_for_each_seed_and_reuses_the_main_runs(study):
    comp, out = study
    assert [p["train_examples"] for p in comp.curve] == [4, 12]
    small = [_eval(out / "curve" / f"n4-seed{s}" / "eval")[0]["f1"] for s in (0, 1)]
    assert comp.curve[0]["values"] == small
    assert comp.curve[1]["values"] == [m["f1"] for m in comp.seed_metrics]  # n = 12: the main
    assert not (out / "curve" / "n12-seed0").exists()
    meta = json.loads((out / "curve" / "n4-seed1" / "prompt" / "softprompt.json").read_text())
    assert meta["train_args"]["max_train_examples"] == 4 and meta["train_args"]["seed"] == 1
    assert comp.curve[0]["std"] == pytest.approx(statistics.stdev(small))
    for name in ("learning_curve.png", "intervals.png"):
        assert (out / name).read_bytes().startswith(PNG)


def test_comparison_json_and_report_md_carry_settings_seeds_and_margins(study):
    comp, out = study
    data = json.loads((out / "comparison.json").read_text())
    settings = data["settings"]
    assert settings["seeds"] == [0, 1] and settings["shots"] == [0, 2]
    assert settings["train_sizes"] == [4, 12] and settings["method"] == "prompt"
    assert settings["split_sizes"]["train"] == 60 and settings["split_sizes"]["test"] == 6
    assert settings["split_sizes"]["train_used"] == 12
    assert settings["commit"] and settings["started"].endswith("UTC")
    model = data["models"][0]
    assert model["intervals"] == comp.intervals and model["curve"] == comp.curve
    report = (out / "report.md").read_text()
    assert "## Settings" in report and " ± " in report and "### Learning curve" in report
    assert "### Margins on f1" in report and "Best value per metric in bold." in report
    assert "2-shot: " in report and "demonstrations per example" in report



def test_report_html_renders_settings_highlights_samples_and_figures(study, browser):
    comp, out = study
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # no external assets
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((out / "report.html").as_uri())
    settings = page.locator("#settings").inner_text()
    for text in ("P (virtual tokens)", "seeds\t0, 1", "commit", "split sizes", "train: 60",
                 "method\tprompt", "epochs\t1"):
        assert text in settings, text
    # The best value per metric is highlighted: the f1 column's best cell is the best system's.
    header = page.locator("table.metrics tr").first.locator("th").all_inner_texts()
    col = header.index("f1")
    best = page.locator("table.metrics td.best").evaluate_all(
        f"cells => cells.filter(c => c.cellIndex === {col}).map(c => c.parentElement.cells[0]"
        ".textContent)")
    top = max(comp.systems[n]["f1"] for n in comp.systems)
    assert set(best) == {n for n in comp.systems if comp.systems[n]["f1"] == top}
    assert page.locator("td.best").first.evaluate("e => getComputedStyle(e).fontWeight") == "700"
    soft_cell = page.locator("table.metrics tr", has_text=SOFT).locator("td").nth(col)
    assert " ± " in soft_cell.inner_text()
    # Sample outputs beside the reference.
    samples = page.locator(".sample")
    assert samples.count() == 5
    assert f"{SOFT} (seed 0)" in samples.first.inner_text()  # of the two seeds
    first = samples.first.locator("table.outputs tr")
    assert first.first.inner_text().startswith("reference")
    assert first.count() == 1 + len(comp.systems)
    # Every figure is embedded and loads.
    sizes = page.locator("figure img").evaluate_all("imgs => imgs.map(i => [i.complete, "
                                                    "i.naturalWidth, i.src.slice(0, 22)])")
    assert len(sizes) == len(list(out.glob("*.png"))) == 5
    assert all(done and width > 0 and src == "data:image/png;base64," for done, width, src in
               sizes)
    assert page.locator(".margins li").count() == len(HARD)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000


def test_reuse_keeps_trained_prompts_and_finished_evaluations(study, tiny_dirs, samples,
                                                              tmp_path):
    _, done = study
    out = tmp_path / "cmp"
    shutil.copytree(done, out)
    marker = out / "curve" / "n4-seed1" / "eval" / "metrics.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "f1": 99.0}))
    shutil.rmtree(out / "systems" / "hard_study")  # as if interrupted before it
    before = load_file(out / "prompt-seed1" / "prompt.safetensors")["prompt_embeddings"]
    comp = _study(tiny_dirs, samples, out, reuse=True)[0]
    assert comp.curve[0]["values"][1] == 99.0  # kept, not re-run
    assert (out / "systems" / "hard_study" / "metrics.json").is_file()  # re-run
    after = load_file(out / "prompt-seed1" / "prompt.safetensors")["prompt_embeddings"]
    assert after.equal(before)  # the finished training was kept, not redone
    with pytest.raises(SoftPromptError, match="holds an evaluation of other test examples"):
        _study(tiny_dirs, samples, out, reuse=True, limit=5)


@pytest.mark.parametrize("overrides, message", [
    ({"train_sizes": [61]}, "--train-sizes 61 exceeds the 60 training records"),
    ({"seeds": [1, 1]}, "--seeds must be distinct"),
    ({"shots": [-1]}, "--shots and --shots-seed must be zero or positive"),
])
def test_study_options_are_checked_before_any_training(tiny_dirs, samples, tmp_path,
                                                       overrides, message):
    with pytest.raises(SoftPromptError, match=message):
        _study(tiny_dirs, samples, tmp_path / "x", **overrides)
    assert not (tmp_path / "x").exists()


def test_k_shot_needs_training_data_and_defaults_to_zero_shot_without(tiny_dirs, samples,
                                                                      study, tmp_path):
    _, done = study
    task = get_task("qa")
    test = str(samples / "qa" / "test.jsonl")
    with pytest.raises(SoftPromptError, match="give --train PATH or --shots 0"):
        compare(task, None, test, tmp_path / "a", prompt_dir=str(done / "prompt-seed0"),
                shots=[3], model_names=[str(tiny_dirs["gpt2"])])
    with pytest.raises(SoftPromptError, match="drop it with --prompt"):
        compare(task, None, test, tmp_path / "a", prompt_dir=str(done / "prompt-seed0"),
                seeds=[0, 1], model_names=[str(tiny_dirs["gpt2"])])
    comp = compare(task, None, test, tmp_path / "b", prompt_dir=str(done / "prompt-seed0"),
                   model_names=[str(tiny_dirs["gpt2"])], limit=2,
                   generation=GenerationConfig(max_new_tokens=2), progress=False)[0]
    assert not any("shot" in name for name in comp.systems)


def test_cli_compare_takes_the_study_flags(tiny_dirs, samples, tmp_path, capsys):
    from softprompt.cli import main

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        return info.value.code

    common = ["compare", "--task", "qa", "--train", str(samples / "qa" / "train.jsonl"),
              "--test", str(samples / "qa" / "test.jsonl"), "--models", str(tiny_dirs["llama"]),
              "--limit", "3", "--max-new-tokens", "2", "--epochs", "1", "--num-virtual-tokens",
              "2", "--max-train-examples", "6", "--val-limit", "0", "--quiet"]
    assert run(*common, "--output", str(tmp_path / "c"), "--seeds", "3,4", "--shots", "0,1",
               "--shots-seed", "2", "--train-sizes", "3") == 0
    assert "CI [" in capsys.readouterr().out
    data = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert data["settings"]["seeds"] == [3, 4] and data["settings"]["shots"] == [0, 1]
    assert data["settings"]["shots_seed"] == 2 and data["settings"]["train_sizes"] == [3]
    assert (tmp_path / "c" / "curve" / "n3-seed4" / "prompt" / "prompt.safetensors").is_file()
    assert run(*common, "--output", str(tmp_path / "d"), "--seeds", "a,b") == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err
