"""Task presets and custom templates; turning records into token ids.

A task is declarative: an input template with ``{field}`` placeholders, the field holding the
target(s), which field may be truncated, a stop string, metrics, and hand-written instructions
for the hard-prompt baselines.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from softprompt.errors import SoftPromptError


@dataclass
class Task:
    """A declarative task: how a record becomes (input text, target, references)."""

    name: str
    template: str  # input text with {field} placeholders, e.g. "{source}\nSummary:"
    target_field: str  # field holding the target (a string, or a list whose first item trains)
    truncate_field: str | None = None  # the field cut when the input is too long
    stop: str | None = None  # generation also stops at this string (after leading whitespace)
    metrics: list[str] = field(default_factory=lambda: ["token_overlap"])
    primary_metric: str = "token_overlap"
    instruction: str = ""  # the study's hand-written prompt (hard-prompt baseline)
    better_instruction: str = ""  # a better hand-written prompt, also a baseline
    max_new_tokens: int = 64
    field_map: dict[str, str] = field(default_factory=dict)  # template name -> record path
    # Wrap each rendered input as the user's message in the tokenizer's chat template, with
    # the assistant turn's generation prompt after it (--chat-template; encode.py does it).
    chat_template: bool = False
    # Decoding controls this task generates with unless told otherwise (GenerationConfig
    # fields among DECODING_DEFAULTS, e.g. {"repetition_penalty": 1.2}); see _preset for how
    # the presets' were chosen.
    decoding: dict[str, Any] = field(default_factory=dict)

    def generation_defaults(self) -> dict[str, Any]:
        """GenerationConfig fields this task sets: ``max_new_tokens`` and its controls."""
        return {"max_new_tokens": self.max_new_tokens, **self.decoding}

    def placeholders(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]

    def required_fields(self) -> list[str]:
        return sorted(set(self.placeholders()) | {self.target_field})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SoftPromptError(f"unknown task keys {unknown}; allowed: {sorted(known)}")
        for key in ("name", "template", "target_field"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise SoftPromptError(f"task needs a non-empty string {key!r}")
        task = cls(**data)
        validate_template(task.template)
        check_decoding(task.decoding)
        return task


DECODING_DEFAULTS = ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens",
                     "penalize_output_only")


def check_decoding(decoding: Any) -> None:
    """A task's ``decoding`` defaults: a mapping of known controls with valid values."""
    from softprompt.config import GenerationConfig

    if not isinstance(decoding, dict) or set(decoding) - set(DECODING_DEFAULTS):
        raise SoftPromptError(f"task key 'decoding' must map some of {list(DECODING_DEFAULTS)} "
                              f"to values, got {decoding!r}")
    GenerationConfig(**decoding)


def validate_template(template: str) -> None:
    """Refuse templates that ``str.format`` cannot fill (unbalanced braces, ``{0}``, ``{}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SoftPromptError(f"template {template!r} is malformed ({exc}); write fields as "
                              f"{{name}} and literal braces as {{{{ }}}}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise SoftPromptError(f"template placeholder {{{name}}} must be a field name like "
                                  f"{{source}}")
        if spec or conv:
            raise SoftPromptError(f"template placeholder {{{name}}} may not carry a format spec")


# The presets' decoding controls (Task.decoding) were chosen on VALIDATION data, never test:
# bench/decoding_defaults.py decodes greedily with the bundled model behind the task's
# hand-written prompt ("hard: ours") on the first N examples of
# ../shared/data/TASK/validation.jsonl, once without controls and once per setting; a setting
# is kept only if it beats no controls by at least 1 point of the primary metric. Runs of
# 2026-11-30 14:38-15:01 UTC (2 shared CPU cores) on the decoding branch's code between
# commits f6dd814 and a93915b (the script did not yet record its commit; it does now), each
# figure below with its command:
#   screen, N=8:  python bench/decoding_defaults.py --tasks qa,summarization --limit 8
#                 --settings '[{"repetition_penalty": 1.2}, {"no_repeat_ngram_size": 3},
#                 {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3},
#                 {"repetition_penalty": 1.1}]'
#                 (and the same for the settings quoted below, per task)
#   confirm, N=30: python bench/decoding_defaults.py --tasks TASK --limit 30
#                 --settings '[SETTING]' (SETTING: the best of the screen)


def _preset(name: str, source_lang: str = "English", target_lang: str = "German") -> Task:
    if name == "summarization":
        return Task("summarization", "{source}\nSummary:", "target", truncate_field="source",
                    stop=None, metrics=["rouge", "token_overlap"], primary_metric="rougeL",
                    instruction="Summarize the following content:",
                    better_instruction="Summarize the following dialogue in one sentence.",
                    max_new_tokens=60,
                    # No decoding controls (see above): N=30, rougeL 7.30 none, 7.43
                    # no_repeat_ngram_size 6 with penalize_output_only (under the margin,
                    # though it stops the loops: 110 s against 285 s of decoding). N=8:
                    # 8.12 none, 0.00 repetition_penalty 1.2 / 1.1 (over the input too:
                    # EOS comes first), 5.61 no_repeat_ngram_size 3 (it bans the input's
                    # "#Person1#"), 6.15 the same over the output (summaries repeat it),
                    # 5.83 repetition_penalty 1.2 over the output.
                    decoding={})
    if name == "qa":
        return Task("qa", "Context: {context}\nQuestion: {question}\nAnswer:", "answers",
                    truncate_field="context", stop="\n", metrics=["squad", "token_overlap"],
                    primary_metric="f1", instruction="Answer the Following Question",
                    better_instruction="Answer the question with a short phrase copied from "
                                       "the context.",
                    max_new_tokens=24,
                    # No decoding controls (see above): every screened one hurt, N=8: F1 9.67
                    # none, 2.51 repetition_penalty 1.2 (also with no_repeat_ngram_size 3),
                    # 3.46 repetition_penalty 1.1, 5.08 no_repeat_ngram_size 3 (all over the
                    # input too: an extractive answer copies the context). No N=30 run.
                    decoding={})
    if name == "translation":
        return Task("translation", f"{source_lang}: {{source}}\n{target_lang}:", "target",
                    truncate_field="source", stop="\n", metrics=["bleu", "token_overlap"],
                    primary_metric="chrf",
                    instruction=f"Translate the following sentence from {source_lang.lower()} "
                                f"to {target_lang.lower()}:",
                    better_instruction=f"Translate the {source_lang} sentence into "
                                       f"{target_lang}.",
                    max_new_tokens=64,
                    # Chosen on validation (see above): N=30, chrF 14.48 none, 17.73
                    # repetition_penalty 1.2 (over the input too: copying English words is
                    # the small model's failure). N=8: 14.64 none, 14.95 repetition_penalty
                    # 1.2, 14.08 no_repeat_ngram_size 3 with penalize_output_only.
                    decoding={"repetition_penalty": 1.2})
    raise SoftPromptError(f"unknown task {name!r}; choose summarization, qa, translation, or "
                          f"give --template and --target-field (or a task YAML file)")


PRESETS = ("summarization", "qa", "translation")


def get_task(name: str | None = None, *, template: str | None = None,
             target_field: str | None = None, field_map: dict[str, str] | None = None,
             source_lang: str = "English", target_lang: str = "German",
             stop: str | None = None) -> Task:
    """Resolve ``--task`` (a preset name or a YAML file) plus template/field overrides."""
    if name and (name.endswith((".yaml", ".yml", ".json")) or Path(name).is_file()):
        task = load_task_file(name)
    elif name:
        task = _preset(name, source_lang, target_lang)
    elif template and target_field:
        task = Task("custom", template, target_field)
    else:
        raise SoftPromptError("give --task (summarization, qa, translation, or a YAML file) or "
                              "--template with --target-field")
    if template:
        validate_template(template)
        task = replace(task, template=template,
                       truncate_field=task.truncate_field if task.truncate_field in
                       _names(template) else None)
    if target_field:
        task = replace(task, target_field=target_field)
    if stop is not None:
        task = replace(task, stop=stop or None)
    if field_map:
        task = replace(task, field_map={**task.field_map, **field_map})
    return task


def _names(template: str) -> list[str]:
    return [n for _, n, _, _ in string.Formatter().parse(template) if n]


def load_task_file(path: str) -> Task:
    """A custom task from YAML/JSON: ``name``, ``template``, ``target_field`` and options."""
    p = Path(path)
    if not p.is_file():
        raise SoftPromptError(f"{path}: task file not found")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml's errors have many types
        # YAML's messages span several lines (with a source excerpt); errors are one line.
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        reason = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise SoftPromptError(f"{where}: cannot parse task file ({reason})") from None
    if not isinstance(data, dict):
        raise SoftPromptError(f"{path}: a task file must be a mapping with name, template, "
                              f"target_field")
    return Task.from_dict(data)


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    """``["source=article", "answers=answers.text"]`` -> ``{"source": "article", ...}``."""
    mapping = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SoftPromptError(f"--field {item!r} must look like NAME=RECORD_FIELD, e.g. "
                                  f"source=article")
        mapping[name] = path
    return mapping


# --- records -> examples ---------------------------------------------------------------------


@dataclass
class Example:
    """One record, rendered: the input text, the training target and all references."""

    id: str
    fields: dict[str, str]  # template fields, as strings
    target: str
    references: list[str]


def _lookup(record: dict, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _origin(record: dict) -> str:
    return getattr(record, "origin", "record")


def make_example(task: Task, record: dict, index: int = 0, with_target: bool = True) -> Example:
    """Validate a record against the task and extract its fields.

    ``with_target=False`` (inference) needs only the template's fields; the example then has
    an empty target and no references.
    """
    where = _origin(record)
    values: dict[str, Any] = {}
    needed = task.required_fields() if with_target else task.placeholders()
    for name in needed:
        path = task.field_map.get(name, name)
        try:
            values[name] = _lookup(record, path)
        except KeyError:
            present = ", ".join(map(str, record)) or "none"
            hint = "" if name == path else f" (mapped from --field {name}={path})"
            raise SoftPromptError(f"{where}: missing field {path!r}{hint}; fields present: "
                                  f"{present}") from None
    fields: dict[str, str] = {}
    for name in task.placeholders():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SoftPromptError(f"{where}: field {name!r} must be text, got "
                                  f"{type(value).__name__}")
        if isinstance(value, (int, float)):
            raise SoftPromptError(f"{where}: field {name!r} must be text, got a number "
                                  f"({value!r}); quote it in the data")
        if not value.strip():
            raise SoftPromptError(f"{where}: field {name!r} is empty")
        fields[name] = value
    if not with_target:
        return Example(str(record.get("id", index)), fields, "", [])
    target = values[task.target_field]
    if isinstance(target, str):
        references = [target]
    elif isinstance(target, list):
        references = target
    else:
        raise SoftPromptError(f"{where}: field {task.target_field!r} must be text or a list of "
                              f"text, got {type(target).__name__}")
    if not references or not all(isinstance(r, str) and r.strip() for r in references):
        raise SoftPromptError(f"{where}: field {task.target_field!r} must hold non-empty text"
                              f"{' (a list of strings)' if isinstance(target, list) else ''}")
    ident = record.get("id", index)
    return Example(str(ident), fields, references[0].strip(), [r.strip() for r in references])


def make_examples(task: Task, records: list[dict]) -> list[Example]:
    return [make_example(task, r, i) for i, r in enumerate(records)]


def input_example(task: Task, item: str | dict, index: int = 0) -> Example:
    """An inference input: a record, or plain text for a template with one field; either is
    checked as a record is (an empty field is refused)."""
    if not isinstance(item, dict):
        names = task.placeholders()
        if len(names) != 1:
            raise SoftPromptError(f"task {task.name!r} needs fields {names}; pass a record "
                                  f"(a JSON object) instead of plain text")
        item = {task.field_map.get(names[0], names[0]): item}
    return make_example(task, item, index, with_target=False)


def parse_input(text: str) -> str | dict:
    """An input given as text: a JSON object is a record, anything else is plain text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise SoftPromptError(f"the input looks like JSON but is not valid ({exc.msg}); "
                                  f"give a JSON object of the task's fields, or plain text"
                                  ) from None
        if isinstance(value, dict):
            return value
    return text


def render_input(task: Task, example: Example, instruction: str = "",
                 fields: dict[str, str] | None = None) -> str:
    """The input text: ``instruction + "\\n"`` (hard prompts only) and the filled template.

    This is the text a chat-template task puts in the user's message (encode.chat_text).
    """
    text = task.template.format(**(fields or example.fields))
    return f"{instruction}\n{text}" if instruction else text


# --- few-shot demonstrations -----------------------------------------------------------------


def draw_demonstrations(task: Task, records: list[dict], k: int, seed: int) -> list[Example]:
    """``k`` training examples for an in-context prompt, drawn without replacement by
    ``random.Random(seed)`` (the same ``k``, ``seed`` and records give the same examples, in
    the same order). Call it with training records only: never the test split."""
    import random

    if k > len(records):
        raise SoftPromptError(f"--shots {k} needs {k} training records; the training data has "
                              f"{len(records)}")
    picks = random.Random(seed).sample(range(len(records)), k)
    return [make_example(task, records[i], i) for i in picks]


def render_demonstration(task: Task, example: Example) -> str:
    """A solved example as the model sees one in training: the filled template, a space and
    the target (``"English: A dog.\\nGerman: Ein Hund."``)."""
    return f"{render_input(task, example)} {example.target}"


def few_shot_instruction(instruction: str, demonstrations: list[str]) -> str:
    """The text :func:`render_input` puts (with a newline) before the input of a few-shot
    prompt: the instruction line, then the demonstrations, each followed by a blank line.

    ``"Translate.\\nEnglish: A dog.\\nGerman: Ein Hund.\\n\\nEnglish: ..."`` is the whole
    input for one demonstration.
    """
    if not demonstrations:
        return instruction
    head = f"{instruction}\n" if instruction else ""
    return head + "\n\n".join(demonstrations) + "\n"
