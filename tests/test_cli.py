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


# --- device and dtype (#10, defect 2) ----------------------------------------------------------


def test_auto_device_and_dtype_resolve_to_the_cpu_and_float32_here():
    import torch

    from softprompt.models import resolve_device, resolve_dtype

    assert not torch.cuda.is_available()  # the test machine: a CPU only
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16


def test_generate_with_dtype_bfloat16_loads_bfloat16_weights(cli, capfd):
    import torch

    from softprompt import api

    run = _main(["generate", "--prompt", str(cli["prompt_dir"]), "--input", "The dog sleeps.",
                 "--max-new-tokens", "6", "--device", "cpu", "--dtype", "bfloat16"], capfd)
    assert run.returncode == 0, str(run)
    pm = api.load_prompt(cli["prompt_dir"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in pm.model.parameters()} == {torch.bfloat16}
    assert pm.model.device == torch.device("cpu")
    assert pm.prompt.dtype == torch.float32  # the prompt stays float32; inputs.py casts it
    assert run.stdout == pm.generate("The dog sleeps.", max_new_tokens=6) + "\n"


def test_evaluate_with_dtype_bfloat16_scores_the_bfloat16_model(cli, capfd, tmp_path):
    import torch

    from softprompt.config import GenerationConfig
    from softprompt.data import read_records
    from softprompt.evaluation import System, evaluate
    from softprompt.models import load_model
    from softprompt.tasks import get_task

    test = SAMPLES / "translation" / "test.jsonl"
    run = _main(["evaluate", "--task", "translation", "--hard", "Translate:", "--test", str(test),
                 "--limit", "2", "--max-new-tokens", "3", "--output", str(tmp_path / "e"),
                 "--model", cli["model"], "--dtype", "bfloat16", "--device", "cpu", "--quiet"],
                capfd)
    assert run.returncode == 0, str(run)
    model, tok = load_model(cli["model"], dtype=torch.bfloat16)
    expected = evaluate(model, tok, get_task("translation"), read_records(test, limit=2),
                        System("hard", instruction="Translate:"),
                        generation=GenerationConfig(**{
                            **get_task("translation").generation_defaults(),
                            "max_new_tokens": 3}))
    rows = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in expected.predictions]
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["loss"] == expected.metrics["loss"]


def test_train_with_dtype_bfloat16_trains_a_float32_prompt(cli, capfd, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    run = _main(["train", "--task", "translation", "--train",
                 str(SAMPLES / "translation" / "train.jsonl"), "--output", str(out),
                 "--model", cli["model"], *TRAIN_FLAGS, "--dtype", "bfloat16", "--device", "cpu"],
                capfd)
    assert run.returncode == 0, str(run)
    prompt = load_file(str(out / "prompt.safetensors"))["prompt_embeddings"]
    assert str(prompt.dtype) == "torch.float32" and prompt.shape == (4, 32)
    assert json.loads((out / "softprompt.json").read_text())["metrics"]["steps"] == 2


DEVICE_ERRORS = [
    (["--device", "tpu9"], "--device 'tpu9' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cuda"], "--device 'cuda': CUDA is not available here"),
    (["--device", "meta"], "--device 'meta' is not supported"),
    (["--dtype", "float8"], "--dtype 'float8' is not supported; use auto, float32, bfloat16, "
                            "float16"),
]


@pytest.mark.parametrize("extra, expected", DEVICE_ERRORS)
@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "compare"])
def test_bad_device_or_dtype_is_one_error_line(cli, capfd, tmp_path, command, extra, expected):
    run = _main([*_command_args(command, cli, tmp_path), *extra], capfd)
    _one_line_error(run, expected)
    assert not (tmp_path / "out").exists()


def _command_args(command: str, cli, tmp_path: Path, model: str | None = None) -> list[str]:
    """A valid command line for each command, writing under ``tmp_path / "out"``."""
    model = model or cli["model"]
    train = str(SAMPLES / "translation" / "train.jsonl")
    test = str(SAMPLES / "translation" / "test.jsonl")
    out = str(tmp_path / "out")
    return {
        "train": ["train", "--task", "translation", "--train", train, "--output", out,
                  "--model", model, *TRAIN_FLAGS],
        "generate": ["generate", "--prompt", str(cli["prompt_dir"]), "--input", "Hi.",
                     "--model", model, "--output", out + ".jsonl"],
        "evaluate": ["evaluate", "--task", "translation", "--hard", "Translate:", "--test", test,
                     "--output", out, "--model", model, "--limit", "2", "--quiet"],
        "compare": ["compare", "--task", "translation", "--train", train, "--test", test,
                    "--output", out, "--models", model, "--limit", "2", "--quiet"],
    }[command]


# --- outputs that cannot be written (#10, defect 11) -------------------------------------------

# (command, --output value with {file} for a regular file and {dir} for a directory, message)
UNWRITABLE = [
    ("train", "/proc/softprompt-x", "--output /proc/softprompt-x: cannot write in /proc"),
    ("train", "{file}/sub", "--output {file}/sub: cannot create it, {file} is a file"),
    ("train", "{file}", "--output {file} is a file; give a directory"),
    ("evaluate", "/proc/softprompt-x", "--output /proc/softprompt-x: cannot write in /proc"),
    ("evaluate", "{file}/sub", "--output {file}/sub: cannot create it, {file} is a file"),
    ("compare", "/proc/softprompt-x", "--output /proc/softprompt-x: cannot write in /proc"),
    ("compare", "{file}/a/b", "--output {file}/a/b: cannot create it, {file} is a file"),
    ("generate", "/proc/softprompt-x.jsonl",
     "--output /proc/softprompt-x.jsonl: cannot write in /proc"),
    ("generate", "{file}/preds.jsonl",
     "--output {file}/preds.jsonl: cannot create it, {file} is a file"),
    ("generate", "{dir}", "--output {dir} is a directory; give a file path"),
]


@pytest.mark.parametrize("command, output, expected", UNWRITABLE)
def test_unwritable_output_is_refused_before_the_model_load(cli, capfd, tmp_path, command,
                                                           output, expected):
    """A model that does not exist: had it been loaded first, its error would show instead."""
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("keep")
    (tmp_path / "adir").mkdir()
    subs = {"{file}": str(blocker), "{dir}": str(tmp_path / "adir")}
    for key, value in subs.items():
        output, expected = output.replace(key, value), expected.replace(key, value)
    argv = _command_args(command, cli, tmp_path, model=str(tmp_path / "no-such-model"))
    argv[argv.index("--output") + 1] = output
    _one_line_error(_main(argv, capfd), expected)
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "blocker.txt"]
    assert not list((tmp_path / "adir").iterdir())


# --- numbers: 0 and negatives are meaningful or refused (#10, defect 12) ------------------------

# (command, flag, value, message); 0 where it has a meaning is left out (--val-limit 0: none,
# --save-steps 0: epochs only, --warmup-steps 0, --patience 0, --temperature 0: greedy, ...).
NUMERIC_ERRORS = [
    *[(cmd, "--limit", v, f"--limit must be positive, got {v}")
      for cmd in ("evaluate", "compare") for v in ("0", "-1")],
    ("evaluate", "--max-length", "0", "--max-length must be positive, got 0"),
    ("compare", "--val-limit", "-1", "--val-limit must be positive (or 0: none), got -1"),
    ("compare", "--eval-batch-size", "0", "--eval-batch-size must be positive, got 0"),
    ("compare", "--eval-seed", "-1", "--eval-seed must be zero or positive, got -1"),
    *[(cmd, "--max-new-tokens", v, f"--max-new-tokens must be positive, got {v}")
      for cmd in ("generate", "evaluate", "compare") for v in ("0", "-2")],
    *[(cmd, "--batch-size", "0", "--batch-size must be positive, got 0")
      for cmd in ("generate", "evaluate", "compare", "train")],
    *[(cmd, "--temperature", "-0.5", "--temperature must be zero or positive, got -0.5")
      for cmd in ("generate", "evaluate", "compare")],
    *[(cmd, "--top-p", v, f"--top-p must be in (0, 1], got {float(v)}")
      for cmd in ("generate", "evaluate", "compare") for v in ("0", "-1", "1.5")],
    *[(cmd, "--seed", "-1", "--seed must be zero or positive, got -1")
      for cmd in ("generate", "evaluate", "compare", "train")],
    *[(cmd, flag, v, f"{flag} must be positive, got {v}")
      for cmd in ("train", "compare")
      for flag, v in (("--num-virtual-tokens", "0"), ("--num-virtual-tokens", "-3"),
                      ("--epochs", "0"), ("--gradient-accumulation-steps", "0"),
                      ("--lr", "-0.1"), ("--max-length", "0"), ("--max-train-examples", "0"),
                      ("--max-eval-examples", "-1"), ("--save-total-limit", "0"))],
    *[(cmd, flag, "-1", f"{flag} must be zero or positive, got -1")
      for cmd in ("train", "compare")
      for flag in ("--warmup-steps", "--patience", "--save-steps")],
    *[(cmd, flag, "-1", f"{flag} must be zero or positive, got -1.0")
      for cmd in ("train", "compare") for flag in ("--weight-decay", "--max-grad-norm")],
]


@pytest.mark.parametrize("command, flag, value, expected", NUMERIC_ERRORS,
                         ids=[f"{c} {f} {v}" for c, f, v, _ in NUMERIC_ERRORS])
def test_zero_or_negative_numbers_are_refused_before_the_model_load(cli, capfd, tmp_path,
                                                                   command, flag, value,
                                                                   expected):
    argv = _command_args(command, cli, tmp_path, model=str(tmp_path / "no-such-model"))
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    _one_line_error(_main(argv, capfd), expected)
    assert not (tmp_path / "out").exists()


# --- --stop (#10, defect 6) ---------------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    ("ü\\n", "ü\n"), ("→", "→"), ("Antwort:\\t", "Antwort:\t"), ("a\\\\nb", "a\\nb"),
    ("C:\\x41", "C:\\x41"), ("日本\\n\\n", "日本\n\n"), ("\\u00fc", "\\u00fc"),
])
def test_stop_keeps_non_ascii_and_reads_only_newline_tab_and_backslash_escapes(given,
                                                                              expected):
    from softprompt.cli import _task, build_parser

    for command in (["evaluate", "--hard", "x", "--test", "t.jsonl", "--output", "o"],
                    ["train", "--train", "t.jsonl", "--output", "o"]):
        args = build_parser().parse_args([*command, "--task", "translation", "--stop", given])
        assert _task(args).stop == expected


# --- compare: generation's own batch size and seed (#10, defect 9) -----------------------------


def test_compare_generation_has_its_own_batch_size_and_seed(cli, capfd, tmp_path):
    out = tmp_path / "cmp"
    run = _main(["compare", "--task", "translation", "--prompt", str(cli["prompt_dir"]),
                 "--test", str(SAMPLES / "translation" / "test.jsonl"), "--output", str(out),
                 "--models", cli["model"], "--limit", "2", "--max-new-tokens", "2",
                 "--batch-size", "2", "--seed", "7", "--eval-batch-size", "5",
                 "--eval-seed", "3", "--quiet"], capfd)
    assert run.returncode == 0, str(run)
    recorded = json.loads((out / "comparison.json").read_text())["generation"]
    assert recorded == {"max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0,
                        "batch_size": 5, "seed": 3, "repetition_penalty": 1.2,  # the preset's
                        "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                        "penalize_output_only": False, "num_beams": 1}


def test_decoding_control_flags_reach_generate_evaluate_and_compare(cli, capfd, tmp_path):
    controls = ["--num-beams", "2", "--repetition-penalty", "1.3", "--no-repeat-ngram-size",
                "2", "--min-new-tokens", "3"]
    options = {"num_beams": 2, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
               "min_new_tokens": 3}
    run = _main(["generate", "--prompt", str(cli["prompt_dir"]), "--input", "The dog sleeps.",
                 "--max-new-tokens", "6", *controls], capfd)
    assert run.returncode == 0, str(run)
    pm = _in_process(cli)
    assert run.stdout == pm.generate("The dog sleeps.", max_new_tokens=6, **options) + "\n"
    test = str(SAMPLES / "translation" / "test.jsonl")
    run = _main(["evaluate", "--prompt", str(cli["prompt_dir"]), "--test", test, "--output",
                 str(tmp_path / "ev"), "--limit", "2", "--max-new-tokens", "4", "--quiet",
                 *controls], capfd)
    assert run.returncode == 0, str(run)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text()
            .splitlines()]
    inputs = [json.loads(line) for line in open(test).read().splitlines()[:2]]
    assert [r["prediction"] for r in rows] == pm.generate(inputs, max_new_tokens=4, **options)
    run = _main(["compare", "--task", "translation", "--prompt", str(cli["prompt_dir"]),
                 "--test", test, "--output", str(tmp_path / "cmp"), "--models", cli["model"],
                 "--limit", "1", "--max-new-tokens", "2", "--quiet", *controls], capfd)
    assert run.returncode == 0, str(run)
    recorded = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["generation"]
    assert {k: recorded[k] for k in options} == options
    run = _main(["generate", "--prompt", str(cli["prompt_dir"]), "--input", "x",
                 "--num-beams", "2", "--temperature", "0.5"], capfd)
    _one_line_error(run, "--num-beams 2 searches deterministically")
