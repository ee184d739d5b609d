"""The README cannot drift: its Python blocks run, its command lines parse, its flags exist.

The Python blocks run offline in a scratch directory. They use the bundled SmolLM2 (the
default model); on this CPU its full run takes minutes, so the bundled alias is pointed at the
tiny GPT-2 built in conftest.py: the same code path (alias -> cached model directory ->
load_model), a smaller real model.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

from softprompt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    """The bodies of the fenced blocks tagged ``lang`` ("" for untagged ones)."""
    blocks, current, tag = [], None, ""
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if tag == lang:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def _command_lines() -> list[list[str]]:
    """Arguments after ``softprompt`` (or ``-m softprompt``) on each command line of the bash
    blocks and each ``$ softprompt ...`` line elsewhere; lines with a ``...`` placeholder are
    left out."""
    lines = []
    for block in _blocks("bash"):
        lines += block.replace("\\\n", " ").splitlines()
    for block in _blocks(""):
        lines += [line[2:] for line in block.splitlines() if line.startswith("$ softprompt ")]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if "softprompt" not in words or "..." in words:
            continue
        at = words.index("softprompt")
        if at == 0 or words[at - 1] == "-m":
            commands.append(words[at + 1:])
    return commands


def test_every_softprompt_command_line_in_the_readme_parses():
    commands = _command_lines()
    assert len(commands) >= 12, commands  # the quickstart, resuming, processes, errors
    assert {c[0] for c in commands} == {"train", "generate", "evaluate", "compare", "serve",
                                        "export", "import", "inspect"}
    parser = build_parser()
    for words in commands:
        args = parser.parse_args(words)  # argparse exits (code 2) on a flag that is gone
        assert args.command == words[0]


def test_synopses_name_only_real_flags_and_every_flag_is_documented():
    subparsers = _subparsers()
    synopses = {b.split()[1]: b for b in _blocks("") if b.startswith("softprompt ")}
    assert set(synopses) == set(subparsers)
    for name, sub in subparsers.items():
        flags = {s for s in sub._option_string_actions if s.startswith("--")} - {"--help"}
        shown = set(re.findall(r"--[a-z][a-z0-9-]*", synopses[name]))
        assert shown <= flags, (name, shown - flags)
        undocumented = [f for f in sorted(flags) if not re.search(rf"{f}(?![a-z-])", README)]
        assert not undocumented, (name, undocumented)


def _resolve(dotted: str) -> object:
    """``softprompt.a.b`` -> the module or the attribute it names (ImportError/AttributeError
    if there is none)."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module_name, _, attr = dotted.rpartition(".")
        return getattr(_resolve(module_name), attr)


def test_every_softprompt_name_in_the_readme_exists():
    names = set(re.findall(r"`(softprompt(?:\.[A-Za-z_]+)+)[`(]", README))
    names.discard("softprompt.json")  # the prompt's metadata file, not a name
    assert {"softprompt.training.train", "softprompt.generation.generate",
            "softprompt.evaluation.evaluate", "softprompt.load_model", "softprompt.train",
            "softprompt.evaluate", "softprompt.compare"} <= names
    for dotted in names:
        assert _resolve(dotted) is not None, dotted


def test_python_blocks_run(tiny_dirs, tmp_path, monkeypatch, capsys):
    from softprompt import api, models

    # The OpenAI-client block needs a running server: tests/test_serve.py runs it against one.
    blocks = [b for b in _blocks("python") if "OpenAI(" not in b]
    assert blocks
    (tmp_path / "src" / "softprompt").mkdir(parents=True)
    (tmp_path / "src" / "softprompt" / "samples").symlink_to(ROOT / "src/softprompt/samples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "bundled_model_dir", lambda alias=None: tiny_dirs["gpt2"])
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    # (split on newlines alone: a tiny model's output may hold other line-breaking characters)
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    assert len(printed) == 8, [line[:60] for line in printed]
    runs = tmp_path / "runs"
    meta = json.loads((runs / "de-py" / "softprompt.json").read_text())
    assert meta["model"] == "smollm2-135m" and meta["num_virtual_tokens"] == 20
    assert printed[0] == str(meta["metrics"]["train_loss"])
    metrics = json.loads((runs / "de-py-eval" / "metrics.json").read_text())
    assert metrics["system"] == "soft prompt" and metrics["n"] == 4
    comparison = json.loads((runs / "de-py-cmp" / "comparison.json").read_text())
    assert comparison["models"][0]["model"] == "smollm2-135m"
    assert printed[5] == str(comparison["models"][0]["systems"]["soft prompt"]["chrf"])
    # The prompt pool decodes both inputs as the loaded prompt does alone.
    pm = api.load_prompt(runs / "de-py")
    assert printed[3] == pm.generate("A dog is running on the beach.", num_beams=2,
                                     repetition_penalty=1.2, no_repeat_ngram_size=3,
                                     min_new_tokens=2)
    assert printed[6] == str(pm.generate(["A dog runs.", "Two cats sleep."]))
    # PEFT, given the exported adapter, picks the tokens we pick (the Interop block).
    alone = pm.generate("A dog is running on the beach.", max_new_tokens=12)
    assert printed[7] == alone
    assert sorted(p.name for p in runs.iterdir()) == ["de-py", "de-py-cmp", "de-py-eval",
                                                      "de-py-peft"]


@pytest.mark.parametrize("name", ["train", "evaluate", "compare", "generate", "load_prompt"])
def test_the_api_functions_are_exported(name):
    import softprompt
    from softprompt import api

    assert getattr(softprompt, name) is getattr(api, name)
