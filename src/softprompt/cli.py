"""Command line: a table of subcommands mapped onto the plain functions in api.py.

Argument parsing only; every option that belongs to a config dataclass is generated from its
fields, so ``--help`` shows the fields' documentation.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from softprompt.config import DEFAULT_MODEL, GenerationConfig, PromptConfig, TrainConfig
from softprompt.errors import SoftPromptError


def _add_dataclass(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                   shown: dict[str, str] | None = None) -> argparse._ArgumentGroup:
    """One flag per field of ``cls``; ``shown`` overrides the default printed in ``--help``
    (where the command sets its own default)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action="store_true", dest=f.name,
                               help=f"{help_text} (default: {(shown or {}).get(f.name, 'off')})")
            continue
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            group.add_argument(flag, dest=f.name, default=default.value,
                               choices=[i.value for i in kind],
                               help=f"{help_text} (default: {default.value})")
            continue
        text = (shown or {}).get(f.name, default.value if hasattr(default, "value") else default)
        if default is None and "(default" in help_text:  # the help says what None means
            shown_default = ""
        else:
            shown_default = f" (default: {text})"
        group.add_argument(flag, dest=f.name, type=kind, default=default, metavar=f.name.upper()
                           if kind is str else kind.__name__.upper(),
                           help=help_text + shown_default)
    return group


def _pick(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", help="summarization, qa, translation, or a task YAML file")
    g.add_argument("--template", help="custom input template with {field} placeholders")
    g.add_argument("--target-field", help="record field holding the target (custom tasks)")
    g.add_argument("--field", action="append", metavar="NAME=PATH", dest="field_map",
                   help="read template field NAME from record PATH (dotted), e.g. "
                        "source=article or answers=answers.text; repeatable")
    g.add_argument("--source-lang", default="English", help="translation source language")
    g.add_argument("--target-lang", default="German", help="translation target language")
    g.add_argument("--stop", default=None, help="stop string for generation (task default); "
                   "\\n is a newline, \\t a tab, \\\\ a backslash")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto",
                   help="where the model runs: auto (CUDA, else MPS, else CPU; the process's "
                        "device under accelerate/torchrun), cpu, cuda, cuda:N, mps "
                        "(default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="model weights: auto (as --precision asks: bfloat16 to generate and "
                        "evaluate in bf16, else float32; training keeps float32 weights under "
                        "autocast, bfloat16 on CUDA), float32, bfloat16, float16 (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="how the frozen model computes: auto (bf16 where the device has native "
                        "bfloat16: a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16; else "
                        "fp32), bf16, fp32; the trained prompt and its optimizer state stay "
                        "float32 (default: auto)")


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": args.device, "dtype": args.dtype, "precision": args.precision}


def _add_chat_arg(p: argparse.ArgumentParser, trained: bool = False) -> None:
    kept = " (default: as the prompt was trained)" if trained else ""
    p.add_argument("--chat-template", action="store_const", const=True,
                   default=None if trained else False,
                   help="wrap each input as the user's message in the tokenizer's chat "
                        "template, the assistant turn's generation prompt after it" + kept)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def parse_stop(text: str) -> str:
    """``--stop``: the text as given, with ``\\n``, ``\\t`` and ``\\\\`` read as newline,
    tab and one backslash (any other character, non-ASCII included, stays as it is)."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def _task(args: argparse.Namespace):
    from softprompt.tasks import get_task, parse_field_map

    stop = None if args.stop is None else parse_stop(args.stop)
    return get_task(args.task, template=args.template, target_field=args.target_field,
                    field_map=parse_field_map(args.field_map), source_lang=args.source_lang,
                    target_lang=args.target_lang, stop=stop)


# --- commands ---------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    task = _task(args)  # a bad task answers before torch is imported
    from softprompt import api

    result = api.train(task, args.train, args.output, validation=args.validation,
                       model=args.model, train_split=args.train_split,
                       validation_split=args.validation_split, overwrite=args.overwrite,
                       resume=args.resume, progress=not args.quiet, **_runtime(args),
                       chat_template=args.chat_template,
                       **_pick(args, PromptConfig), **_pick(args, TrainConfig))
    from softprompt.distributed import distributed_state

    if distributed_state().is_main_process:
        print(f"saved prompt to {args.output} ({json.dumps(result.meta.metrics)})")
    return 0


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """GenerationConfig flags given; ``--max-new-tokens`` and the decoding controls left out
    mean the task's."""
    options = _pick(args, GenerationConfig)
    for name in TASK_DEFAULT:
        if options.get(name) is None:
            options.pop(name, None)
    return options


def _decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding controls given (compare: the other generation flags are its own)."""
    return {name: value for name, value in _generation_options(args).items()
            if name in DECODING_FLAGS}


def cmd_generate(args: argparse.Namespace) -> int:
    from softprompt import api, atomic
    from softprompt.data import read_records
    from softprompt.tasks import parse_input

    if (args.input is None) == (args.file is None):
        raise SoftPromptError("give exactly one of --input TEXT or --file PATH")
    options = _generation_options(args)
    GenerationConfig(**options)  # bad values answer before the model load
    if args.output:
        atomic.check_writable(args.output, "--output", directory=False)
    items = ([parse_input(args.input)] if args.input is not None
             else list(read_records(args.file, args.file_split)))
    pm = api.load_prompt(args.prompt, model=args.model, chat_template=args.chat_template,
                         **_runtime(args))
    outputs = pm.generate(items, progress=args.file is not None, **options)
    if args.input is not None:
        print(outputs[0])
        return 0
    lines = "".join(json.dumps({"id": rec.get("id", i), "prediction": out},
                               ensure_ascii=False) + "\n"
                    for i, (rec, out) in enumerate(zip(items, outputs)))
    if args.output:
        atomic.write_text(args.output, lines)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    chosen = [args.prompt is not None, args.hard is not None, args.no_instruction]
    if sum(chosen) != 1:
        raise SoftPromptError("give exactly one of --prompt DIR, --hard TEXT, --no-instruction")
    task = _task(args) if args.prompt is None or args.task or args.template else None
    from softprompt import api

    result = api.evaluate(args.test, args.output, prompt=args.prompt, hard=args.hard,
                          task=task, model=args.model, test_split=args.test_split,
                          limit=args.limit, max_length=args.max_length,
                          overwrite=args.overwrite, progress=not args.quiet, **_runtime(args),
                          shots=args.shots, shots_seed=args.shots_seed, train=args.train,
                          train_split=args.train_split, chat_template=args.chat_template,
                          **_generation_options(args))
    print(json.dumps(result.metrics, indent=1))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    task = _task(args)
    from softprompt import api
    from softprompt.comparison import summary

    comparisons = api.compare(
        task, args.train, args.test, args.output, validation=args.validation,
        prompt=args.prompt, hard=args.hard or (), models=args.models,
        train_split=args.train_split, validation_split=args.validation_split,
        test_split=args.test_split, limit=args.limit, val_limit=args.val_limit,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        eval_batch_size=args.eval_batch_size, eval_seed=args.eval_seed, **_study_options(args),
        overwrite=args.overwrite, reuse=args.reuse, progress=not args.quiet, **_runtime(args),
        chat_template=args.chat_template, **_pick(args, PromptConfig), **_pick(args, TrainConfig),
        **_decoding_options(args))
    print(summary(comparisons))
    print(f"\nreport: {Path(args.output) / 'report.md'}")
    return 0


def _int_list(flag: str):
    """An argparse type: ``"0,1,2"`` -> ``[0, 1, 2]``, a one-line error naming ``flag``."""
    def parse(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, e.g. "
                                             f"0,1,2; got {text!r}") from None
    return parse


def _add_study_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("study: few-shot baselines, seeds, learning curve")
    g.add_argument("--shots", type=_int_list("--shots"), default=None, metavar="K1,K2",
                   help="hard baselines with K demonstrations from --train each; 0 is "
                        "zero-shot (default: 0,3 with --train, else 0)")
    g.add_argument("--shots-seed", type=int, default=0, metavar="INT",
                   help="seed that draws the demonstrations (default: 0)")
    g.add_argument("--seeds", type=_int_list("--seeds"), default=None, metavar="S1,S2",
                   help="train one soft prompt per seed: mean ± std and intervals over them "
                        "(default: --seed)")
    g.add_argument("--train-sizes", type=_int_list("--train-sizes"), default=None,
                   metavar="N1,N2", help="learning curve: also train on the first N training "
                   "examples for each N (every seed)")


def _study_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"shots": args.shots, "shots_seed": args.shots_seed, "seeds": args.seeds,
            "train_sizes": args.train_sizes or ()}


def cmd_serve(args: argparse.Namespace) -> int:
    from softprompt.serving.app import serve

    serve(args.prompts, model=args.model, host=args.host, port=args.port,
          api_key=args.api_key, max_batch_size=args.max_batch_size,
          max_new_tokens_limit=args.max_new_tokens_limit,
          prefix_cache_mb=args.prefix_cache_mb, **_runtime(args))
    return 0


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True,
                   help="directory whose sub-directories are trained prompts (each served "
                        "under its directory name)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the frozen model every prompt uses")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="requests decoded together at most (default: 32)")
    p.add_argument("--max-new-tokens-limit", type=int, default=512,
                   help="largest max_tokens a request may ask for (default: 512)")
    p.add_argument("--prefix-cache-mb", type=int, default=512,
                   help="memory bound of the prompts' cached key/values (default: 512)")
    _add_runtime_args(p)


# Unset, these generation flags are the task's (max_new_tokens, and the decoding controls of
# its preset); num_beams is not a task setting but stays unset so that compare's flag is
# passed only when given.
DECODING_FLAGS = ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
                  "penalize_output_only", "num_beams")
TASK_DEFAULT = {"max_new_tokens": "the task's", "repetition_penalty": "the task's, else 1.0",
                "no_repeat_ngram_size": "the task's, else 0", "min_new_tokens":
                "the task's, else 0", "penalize_output_only": "the task's, else off",
                "num_beams": "1"}
UNSET = dict.fromkeys(TASK_DEFAULT)  # argparse defaults: None, the task decides


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    _add_task_args(p)
    p.add_argument("--prompt", help="a trained prompt directory (soft prompt system)")
    p.add_argument("--hard", help="a hand-written instruction put before each input")
    p.add_argument("--no-instruction", action="store_true", help="the plain template alone")
    p.add_argument("--test", required=True, help="test data: .jsonl, .json, .csv or hf:NAME")
    p.add_argument("--test-split", default="test", help="split of an hf: --test (default: test)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--model", default=None, help="model (default: the prompt's, or "
                   f"{DEFAULT_MODEL})")
    _add_runtime_args(p)
    _add_chat_arg(p, trained=True)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    p.add_argument("--max-length", type=int, default=1024,
                   help="input tokens kept per example (default: 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace results in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_few_shot_args(p)
    _add_dataclass(p, GenerationConfig, shown=TASK_DEFAULT)
    p.set_defaults(**UNSET)


def _add_few_shot_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("few-shot")
    g.add_argument("--shots", type=int, default=0, metavar="K",
                   help="put K solved training examples before each input of the hard prompt "
                        "(as many as fit; default: 0)")
    g.add_argument("--shots-seed", type=int, default=0, metavar="INT",
                   help="seed that draws the K demonstrations (default: 0)")
    g.add_argument("--train", help="training data the demonstrations come from (with --shots)")
    g.add_argument("--train-split", default="train", help="split of an hf: --train "
                   "(default: train)")


def _compare_parser(p: argparse.ArgumentParser) -> None:
    _add_task_args(p)
    p.add_argument("--train", help="training data for the soft prompt")
    p.add_argument("--train-split", default="train", help="split of an hf: --train "
                   "(default: train)")
    p.add_argument("--validation", help="validation data (early stopping, metric per epoch)")
    p.add_argument("--validation-split", default="validation",
                   help="split of an hf: --validation (default: validation)")
    p.add_argument("--test", required=True, help="test data")
    p.add_argument("--test-split", default="test", help="split of an hf: --test (default: test)")
    p.add_argument("--output", required=True, help="output directory for the report")
    p.add_argument("--prompt", help="use this trained prompt instead of training one")
    p.add_argument("--hard", action="append", help="an extra hand-written instruction; "
                   "repeatable (the study's and our own are always included)")
    p.add_argument("--models", default=DEFAULT_MODEL,
                   help="comma-separated models; several give a metric-vs-size plot")
    _add_runtime_args(p)
    _add_chat_arg(p)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test records")
    p.add_argument("--val-limit", type=int, default=20,
                   help="validation records generated for the per-epoch metric (0: none; "
                        "default: 20)")
    p.add_argument("--overwrite", action="store_true", help="replace results in --output")
    p.add_argument("--reuse", action="store_true",
                   help="keep evaluations already in --output; run only missing systems")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_study_args(p)
    _add_dataclass(p, PromptConfig)
    _add_dataclass(p, TrainConfig)
    g = _add_dataclass(p, GenerationConfig, skip=("seed", "batch_size"), shown=TASK_DEFAULT)
    g.add_argument("--eval-batch-size", type=int, default=16, metavar="INT",
                   help="Inputs decoded together in evaluation (default: 16)")
    g.add_argument("--eval-seed", type=int, default=0, metavar="INT",
                   help="Seed for sampling in evaluation (default: 0)")
    p.set_defaults(**UNSET)


def _train_parser(p: argparse.ArgumentParser) -> None:
    _add_task_args(p)
    p.add_argument("--train", required=True, help="training data: .jsonl, .json, .csv or hf:NAME")
    p.add_argument("--train-split", "--split", dest="train_split", default="train",
                   help="split of an hf: --train (default: train)")
    p.add_argument("--validation", help="validation data (early stopping, best prompt)")
    p.add_argument("--validation-split", default="validation",
                   help="split of an hf: --validation (default: validation)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias, local dir or hub id")
    _add_runtime_args(p)
    _add_chat_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace a prompt in --output")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_dataclass(p, PromptConfig)
    _add_dataclass(p, TrainConfig)


def _generate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="directory written by `softprompt train`")
    p.add_argument("--input", help="one input: plain text, or a JSON record for multi-field tasks")
    p.add_argument("--file", help="a .jsonl/.json/.csv file (or hf:NAME) of records to "
                   "generate for")
    p.add_argument("--file-split", default="test", help="split of an hf: --file (default: test)")
    p.add_argument("--output", help="write JSONL predictions to this file (default: stdout)")
    p.add_argument("--model", default=None, help="override the model recorded with the prompt")
    _add_runtime_args(p)
    _add_chat_arg(p, trained=True)
    _add_dataclass(p, GenerationConfig, shown=TASK_DEFAULT)
    p.set_defaults(**UNSET)


# --- PEFT interop and inspection (softprompt.interop, softprompt.inspection) ------------------


def cmd_export(args: argparse.Namespace) -> int:
    from softprompt.interop import export_peft

    out = export_peft(args.directory, args.output, model=args.model, overwrite=args.overwrite)
    kind = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"]
    print(f"wrote {kind} adapter to {out}; load it with "
          f"PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from softprompt.interop import import_peft

    meta = import_peft(args.adapter, args.output, model=args.model, task=args.task,
                       overwrite=args.overwrite)
    print(f"saved {getattr(meta, 'method', 'prompt')} ({meta.num_virtual_tokens} virtual "
          f"tokens, model {meta.model}) to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from softprompt.inspection import inspect_prompt

    result = inspect_prompt(args.directory, top_k=args.top_k, model=args.model, plot=args.plot)
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else result.format())
    return 0


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a trained prompt directory")
    p.add_argument("--format", choices=["peft"], required=True,
                   help="peft: adapter_config.json + adapter_model.safetensors (PEFT 0.21)")
    p.add_argument("--output", required=True, help="the adapter directory to write")
    p.add_argument("--model", default=None, help="override the model recorded with the prompt")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter in --output")


def _import_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="ADAPTER", help="a PEFT PROMPT_TUNING, P_TUNING or "
                   "PREFIX_TUNING adapter directory")
    p.add_argument("--output", required=True, help="the prompt directory to write")
    p.add_argument("--model", default=None,
                   help="override the adapter's base_model_name_or_path")
    p.add_argument("--task", default=None, help="task recorded with the prompt (summarization, "
                   "qa, translation or a YAML file; default: the plain {text} task)")
    p.add_argument("--overwrite", action="store_true", help="replace a prompt in --output")


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a trained prompt or PEFT adapter directory")
    p.add_argument("--top-k", type=int, default=5,
                   help="nearest vocabulary tokens per virtual token (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG: similarity heat map (and per-layer norms for a prefix)")
    p.add_argument("--model", default=None, help="override the model recorded with the prompt")


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "train": (_train_parser, cmd_train, "train a soft prompt"),
    "generate": (_generate_parser, cmd_generate, "generate with a trained prompt"),
    "evaluate": (_evaluate_parser, cmd_evaluate, "score a soft or hard prompt on a test set"),
    "compare": (_compare_parser, cmd_compare, "soft vs hard prompts, with a report"),
    "serve": (_serve_parser, cmd_serve, "serve many prompts over an OpenAI-compatible API"),
    "export": (_export_parser, cmd_export, "write a prompt as a PEFT adapter"),
    "import": (_import_parser, cmd_import, "convert a PEFT adapter into a prompt directory"),
    "inspect": (_inspect_parser, cmd_inspect, "nearest tokens, norms and plots of a prompt"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    from softprompt import __version__

    parser.add_argument("--version", action="version", version=f"softprompt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except SoftPromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


__all__ = ["main", "build_parser", "COMMANDS"]
