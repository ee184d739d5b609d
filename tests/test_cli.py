"""The command line as users run it: a real ``python -m softprompt`` subprocess per command.

Every process pays for importing torch and transformers (seconds), so the fixture trains once
and then starts all remaining commands at the same time; each test checks one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "samples"
TRAIN_FLAGS = ["--max-train-examples", "8", "--epochs", "1", "--batch-size", "4",
               "--num-virtual-tokens", "4", "--quiet"]


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"softprompt {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # what a user sees, not what conftest quiets
    return env


def _start(args: list[str], cwd: Path) -> tuple[list[str], subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8")
    return args, proc


def _finish(started: tuple[list[str], subprocess.Popen], timeout: float = 300) -> Run:
    args, proc = started
    stdout, stderr = proc.communicate(timeout=timeout)
    return Run(args, proc.returncode, stdout, stderr)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


GOOD = [{"id": "a", "source": "The dog sleeps.", "target": "Der Hund schläft."},
        {"id": "b", "source": "It rains today.", "target": "Heute regnet es."}]

# name -> (train arguments with {dir} for the scratch directory, expected message part)
TRAIN_ERRORS = {
    "missing train file": (["--task", "translation", "--train", "{dir}/nope.jsonl"],
                           "nope.jsonl: file not found"),
    "malformed JSON": (["--task", "translation", "--train", "{dir}/malformed.jsonl"],
                       "malformed.jsonl:2: invalid JSON"),
    "missing field": (["--task", "translation", "--train", "{dir}/missing.jsonl"],
                      "missing.jsonl:2: missing field 'source'; fields present: id, text, target"),
    "empty dataset": (["--task", "translation", "--train", "{dir}/empty.jsonl"],
                      "empty.jsonl: no records found"),
    "unknown task": (["--task", "poetry", "--train", "{dir}/good.jsonl"],
                     "unknown task 'poetry'"),
    "zero virtual tokens": (["--task", "translation", "--train", "{dir}/good.jsonl",
                             "--num-virtual-tokens", "0"],
                            "--num-virtual-tokens must be positive, got 0"),
    "zero lr": (["--task", "translation", "--train", "{dir}/good.jsonl", "--lr", "0"],
                "--lr must be positive, got 0.0"),
    "negative epochs": (["--task", "translation", "--train", "{dir}/good.jsonl",
                         "--epochs", "-1"], "--epochs must be positive, got -1"),
    "bad field map": (["--task", "translation", "--train", "{dir}/good.jsonl",
                       "--field", "source"], "--field 'source' must look like NAME=RECORD_FIELD"),
    "prompt exists": (["--task", "translation", "--train", "{dir}/good.jsonl"],
                      "already holds a prompt; pass --overwrite"),
    # The malformed-input corpus: each file is written by the `cli` fixture.
    "JSON array line": (["--task", "translation", "--train", "{dir}/array.jsonl"],
                        "array.jsonl:2: expected a JSON object, got list"),
    "number where text": (["--task", "translation", "--train", "{dir}/number.jsonl"],
                          "number.jsonl:1: field 'source' must be text, got a number"),
    "answers not text": (["--task", "qa", "--train", "{dir}/answers.jsonl"],
                         "answers.jsonl:1: field 'answers' must be text or a list of text"),
    "empty field": (["--task", "translation", "--train", "{dir}/blank.jsonl"],
                    "blank.jsonl:2: field 'source' is empty"),
    "invalid UTF-8": (["--task", "translation", "--train", "{dir}/latin1.jsonl"],
                      "latin1.jsonl:2: not valid UTF-8"),
    "CSV missing column": (["--task", "translation", "--train", "{dir}/short.csv"],
                           "short.csv:3: row has 1 columns but the header has 2"),
    "10 MB line": (["--task", "translation", "--train", "{dir}/huge.jsonl"],
                   "huge.jsonl:1: record is 10.0M characters"),
    "unknown placeholder": (["--template", "{source} means {meaning}", "--target-field",
                             "target", "--train", "{dir}/good.jsonl"],
                            "good.jsonl:1: missing field 'meaning'"),
}


@pytest.fixture(scope="module")
def cli(tiny_dirs, tmp_path_factory):
    """Train once, then run the other subprocesses concurrently; returns the runs by name."""
    base = tmp_path_factory.mktemp("cli")
    model = str(tiny_dirs["gpt2"])
    _write_jsonl(base / "good.jsonl", GOOD)
    (base / "malformed.jsonl").write_text(json.dumps(GOOD[0]) + '\n{"source": "x", \n')
    _write_jsonl(base / "missing.jsonl", [GOOD[0], {"id": "c", "text": "Hi.", "target": "Hallo."}])
    (base / "empty.jsonl").write_text("")
    (base / "array.jsonl").write_text(json.dumps(GOOD[0]) + '\n["source", "target"]\n')
    _write_jsonl(base / "number.jsonl", [{"source": 12, "target": "zwölf"}])
    _write_jsonl(base / "answers.jsonl", [{"context": "C.", "question": "Q?", "answers": 3}])
    _write_jsonl(base / "blank.jsonl", [GOOD[0], {"source": " ", "target": "x"}])
    (base / "latin1.jsonl").write_bytes(json.dumps(GOOD[0]).encode() + b"\n"
                                        + '{"source": "Grüße", "target": "x"}\n'.encode("latin-1"))
    (base / "short.csv").write_text("source,target\nThe dog sleeps.,Der Hund schläft.\nRain.\n")
    _write_jsonl(base / "huge.jsonl", [{"source": "a" * 10_000_000, "target": "x"}])
    (base / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (base / "good.jsonl").read_bytes())
    _write_jsonl(base / "inputs.jsonl", [{"id": "x1", "source": "The cat is on the table.",
                                          "target": "Die Katze ist auf dem Tisch."},
                                         {"id": "x2", "source": "We drink coffee.",
                                          "target": "Wir trinken Kaffee."},
                                         {"source": "Rain.", "target": "Regen."}])
    _write_jsonl(base / "untargeted.jsonl", [{"id": "x1", "source": "The cat is on the table."}])

    prompt_dir = base / "prompt"
    runs = {"train": _finish(_start(
        ["train", "--task", "translation", "--train",
         str(SAMPLES / "translation" / "train.jsonl"), "--output", str(prompt_dir),
         "--model", model, *TRAIN_FLAGS], base))}
    snapshot = _snapshot(prompt_dir) if prompt_dir.is_dir() else {}
    started = {
        "generate --input": _start(["generate", "--prompt", str(prompt_dir), "--input",
                                    "The dog sleeps.", "--max-new-tokens", "6"], base),
        "generate --file": _start(["generate", "--prompt", str(prompt_dir), "--file",
                                   str(base / "inputs.jsonl"), "--output",
                                   str(base / "preds.jsonl"), "--max-new-tokens", "6"], base),
        # One error raised after the model is loaded, one before.
        "prompt exists": _start(["train", *TRAIN_FLAGS, *_error_args("prompt exists", base),
                                 "--output", str(prompt_dir), "--model", model], base),
        "missing train file": _start(["train", *TRAIN_FLAGS,
                                      *_error_args("missing train file", base),
                                      "--output", str(_out("missing train file", base)),
                                      "--model", model], base),
    }
    runs.update({name: _finish(s) for name, s in started.items()})
    return {"runs": runs, "base": base, "prompt_dir": prompt_dir, "model": model,
            "snapshot_after_train": snapshot}


def _error_args(name: str, base: Path) -> list[str]:
    return [a.replace("{dir}", str(base)) for a in TRAIN_ERRORS[name][0]]


def _out(name: str, base: Path) -> Path:
    return base / ("out-" + name.replace(" ", "-"))


def _ok(run: Run) -> None:
    assert run.returncode == 0, str(run)
    assert "Traceback" not in run.stderr, str(run)


def _one_line_error(run: Run, expected: str) -> None:
    assert run.returncode == 2, str(run)
    assert "Traceback" not in run.stderr, str(run)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, str(run)
    assert lines[0].startswith("error: "), str(run)
    assert expected in lines[0], str(run)
    assert run.stdout == "", str(run)


# --- success ----------------------------------------------------------------------------------


def test_train_writes_a_prompt(cli):
    run, prompt_dir = cli["runs"]["train"], cli["prompt_dir"]
    _ok(run)
    assert run.stdout.startswith(f"saved prompt to {prompt_dir} (")
    metrics = json.loads(run.stdout.strip().split(" (", 1)[1][:-1])
    assert metrics["steps"] == 2 and metrics["epochs_run"] == 1
    assert {"prompt.safetensors", "softprompt.json", "log.jsonl"} <= {
        p.name for p in prompt_dir.iterdir()}
    meta = json.loads((prompt_dir / "softprompt.json").read_text())
    assert meta["model"] == cli["model"] and meta["num_virtual_tokens"] == 4
    assert meta["train_args"]["max_train_examples"] == 8
    # --quiet: no progress bars, only the epoch summary.
    assert [line.split()[0] for line in run.stderr.splitlines()] == ["epoch=1"], str(run)


def _in_process(cli):
    from softprompt import api
    from softprompt.models import load_model

    return api.load_prompt(cli["prompt_dir"], loaded=load_model(cli["model"]))


def test_generate_input_matches_the_python_api(cli):
    run = cli["runs"]["generate --input"]
    _ok(run)
    assert run.stderr == "", str(run)
    expected = _in_process(cli).generate("The dog sleeps.", max_new_tokens=6)
    assert run.stdout == expected + "\n"


def test_generate_file_writes_jsonl(cli):
    run = cli["runs"]["generate --file"]
    _ok(run)
    assert run.stdout == ""
    lines = (cli["base"] / "preds.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["x1", "x2", 2]
    records = [json.loads(line) for line in (cli["base"] / "inputs.jsonl").read_text().splitlines()]
    expected = _in_process(cli).generate(records, max_new_tokens=6)
    assert [r["prediction"] for r in rows] == expected


# --- errors: exit 2, one line, nothing written ------------------------------------------------


def test_error_after_model_load_is_one_line(cli):
    """No "Loading weights" progress bar before the error line (models.load_model)."""
    _one_line_error(cli["runs"]["prompt exists"], TRAIN_ERRORS["prompt exists"][1])
    assert cli["snapshot_after_train"]
    assert _snapshot(cli["prompt_dir"]) == cli["snapshot_after_train"]


def test_error_before_model_load_is_one_line(cli):
    _one_line_error(cli["runs"]["missing train file"], TRAIN_ERRORS["missing train file"][1])
    assert not _out("missing train file", cli["base"]).exists()


def _main(argv: list[str], capfd) -> Run:
    """The same entry point in this process: cheap enough to try every bad input."""
    from softprompt.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capfd.readouterr()
    return Run(argv, info.value.code, out, err)


@pytest.mark.parametrize("name", list(TRAIN_ERRORS))
def test_bad_train_input_is_one_error_line_and_writes_nothing(cli, name, capfd):
    base = cli["base"]
    out = cli["prompt_dir"] if name == "prompt exists" else _out(name, base) / "in-process"
    run = _main(["train", *TRAIN_FLAGS, *_error_args(name, base), "--output", str(out),
                 "--model", cli["model"]], capfd)
    _one_line_error(run, TRAIN_ERRORS[name][1])
    if name == "prompt exists":
        assert _snapshot(out) == cli["snapshot_after_train"]
    else:
        assert not out.parent.exists()


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--prompt", "{dir}/no-prompt", "--input", "Hi."], "softprompt.json not found"),
    (["generate", "--prompt", "{prompt}", "--input", "Hi.", "--file", "{dir}/good.jsonl"],
     "exactly one of --input TEXT or --file PATH"),
    (["generate", "--prompt", "{prompt}", "--file", "{dir}/malformed.jsonl"],
     "malformed.jsonl:2: invalid JSON"),
    (["generate", "--prompt", "{prompt}", "--input", '{"source": 1, "target": "x"}'],
     "field 'source' must be text, got a number"),
])
def test_bad_generate_input_is_one_error_line(cli, capfd, argv, expected):
    argv = [a.replace("{dir}", str(cli["base"])).replace("{prompt}", str(cli["prompt_dir"]))
            for a in argv]
    _one_line_error(_main(argv, capfd), expected)


def test_generate_for_records_without_a_target(cli, capfd):
    preds = cli["base"] / "untargeted-preds.jsonl"
    run = _main(["generate", "--prompt", str(cli["prompt_dir"]), "--file",
                 str(cli["base"] / "untargeted.jsonl"), "--output", str(preds),
                 "--max-new-tokens", "3"], capfd)
    assert run.returncode == 0, str(run)
    assert len(preds.read_text().splitlines()) == 1


def test_utf8_bom_is_accepted_by_the_cli(cli, capfd, tmp_path):
    out = tmp_path / "bom-out"
    run = _main(["train", *TRAIN_FLAGS, "--task", "translation", "--train",
                 str(cli["base"] / "bom.jsonl"), "--output", str(out), "--model", cli["model"]],
                capfd)
    assert run.returncode == 0, str(run)
    assert (out / "prompt.safetensors").is_file()


def _broken_prompt(cli, tmp_path: Path, name: str) -> Path:
    import shutil

    broken = tmp_path / name
    shutil.copytree(cli["prompt_dir"], broken)
    return broken


def test_prompt_of_another_hidden_size_is_refused(cli, capfd, tmp_path):
    import torch
    from safetensors.torch import save_file

    broken = _broken_prompt(cli, tmp_path, "wide")
    save_file({"prompt_embeddings": torch.zeros(4, 48)}, str(broken / "prompt.safetensors"))
    meta = json.loads((broken / "softprompt.json").read_text())
    (broken / "softprompt.json").write_text(json.dumps({**meta, "hidden_size": 48}))
    run = _main(["generate", "--prompt", str(broken), "--input", "Hi."], capfd)
    _one_line_error(run, "prompt hidden size 48 does not match the model's 32")


@pytest.mark.parametrize("content, expected", [
    ("{not json", "softprompt.json is not valid JSON"),
    ("[1, 2]", "softprompt.json must hold a JSON object, got list"),
    ('{"model": "m", "task": {}, "num_virtual_tokens": "4", "hidden_size": 32}',
     "field 'num_virtual_tokens' must be an integer"),
])
def test_invalid_softprompt_json_is_refused(cli, capfd, tmp_path, content, expected):
    broken = _broken_prompt(cli, tmp_path, "bad-json")
    (broken / "softprompt.json").write_text(content)
    run = _main(["generate", "--prompt", str(broken), "--input", "Hi."], capfd)
    _one_line_error(run, expected)
