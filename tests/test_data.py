"""Reading datasets and mapping records onto tasks: every bad input names file:line and a fix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.tasks import (
    Task,
    get_task,
    load_task_file,
    make_example,
    make_examples,
    parse_field_map,
    render_input,
    validate_template,
)

ROWS = [{"id": "a", "source": "The dog sleeps.", "target": "Der Hund schläft."},
        {"id": "b", "source": "It rains.", "target": "Es regnet."}]


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(SoftPromptError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


# --- reading each format ----------------------------------------------------------------------


def test_read_jsonl(tmp_path):
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS) + "\n   \n")  # blank lines are skipped
    records = read_records(path)
    assert records == ROWS
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:2"]


def test_read_json_list(tmp_path):
    path = _write(tmp_path / "d.json", json.dumps(ROWS, indent=2))
    records = read_records(path)
    assert records == ROWS
    assert records[1].origin == f"{path}:item 1"


def test_read_csv(tmp_path):
    path = _write(tmp_path / "d.csv", 'id,source,target\na,"The dog, asleep.",Der Hund.\n'
                                      'b,It rains.,Es regnet.\n')
    records = read_records(path)
    assert records == [{"id": "a", "source": "The dog, asleep.", "target": "Der Hund."},
                       {"id": "b", "source": "It rains.", "target": "Es regnet."}]
    assert [r.origin for r in records] == [f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_is_accepted(tmp_path, suffix):
    text = {".jsonl": _jsonl(ROWS), ".json": json.dumps(ROWS),
            ".csv": "id,source,target\na,The dog sleeps.,Der Hund schläft.\n"}[suffix]
    path = _write(tmp_path / f"d{suffix}", b"\xef\xbb\xbf" + text.encode("utf-8"))
    records = read_records(path)
    assert records[0]["source"] == "The dog sleeps."
    assert records[0]["target"] == "Der Hund schläft."
    assert "id" in records[0]  # the BOM did not end up in the first key


def test_limit_and_sample_data(samples):
    records = read_records(samples / "translation" / "train.jsonl", limit=3)
    assert len(records) == 3
    examples = make_examples(get_task("translation"), records)
    assert examples[0].id == "translation-train-000"


def test_unicode_line_separators_inside_a_jsonl_value(tmp_path):
    # U+2028 is a line break for str.splitlines but not for JSONL.
    row = {"source": "one\u2028two", "target": "x"}
    path = _write(tmp_path / "d.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert read_records(path) == [row]


# --- bad files --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    msg = _error(read_records, tmp_path / "nope.jsonl")
    assert msg == f"{tmp_path / 'nope.jsonl'}: file not found"
    assert "not a file" in _error(read_records, tmp_path)


def test_malformed_json_line_names_the_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS) + '{"source": "x", "target": \n')
    msg = _error(read_records, path)
    assert msg.startswith(f"{path}:3: invalid JSON")
    assert "one JSON object" in msg


def test_array_line_instead_of_object(tmp_path):
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS[:1]) + '["x", "y"]\n')
    msg = _error(read_records, path)
    assert msg.startswith(f"{path}:2: expected a JSON object, got list")


def test_json_file_that_is_not_a_list(tmp_path):
    assert "must hold a list" in _error(read_records, _write(tmp_path / "d.json", '{"a": 1}'))
    msg = _error(read_records, _write(tmp_path / "e.json", '[{"a": 1}, 5]'))
    assert "item 1 is int" in msg
    msg = _error(read_records, _write(tmp_path / "f.json", '[\n{"a": 1},\n{"a": }\n]'))
    assert msg.startswith(f"{tmp_path / 'f.json'}:3: invalid JSON")


@pytest.mark.parametrize("name, content", [
    ("d.jsonl", ""), ("d.jsonl", "\n\n  \n"), ("d.json", "[]"), ("d.csv", ""),
    ("d.csv", "source,target\n"),
])
def test_empty_dataset(tmp_path, name, content):
    msg = _error(read_records, _write(tmp_path / name, content))
    assert "no records found" in msg and msg.startswith(str(tmp_path / name))


def test_invalid_utf8_names_the_line(tmp_path):
    data = _jsonl(ROWS).encode("utf-8") + b'{"source": "caf\xe9", "target": "x"}\n'
    path = _write(tmp_path / "d.jsonl", data)
    msg = _error(read_records, path)
    assert msg.startswith(f"{path}:3: not valid UTF-8")
    assert "re-save" in msg


@pytest.mark.parametrize("row, found", [("c,It snows.", 2), ("c,It snows.,Es schneit.,extra", 4)])
def test_csv_row_with_wrong_column_count(tmp_path, row, found):
    path = _write(tmp_path / "d.csv", f"id,source,target\na,It rains.,Es regnet.\n{row}\n")
    msg = _error(read_records, path)
    assert msg == f"{path}:3: row has {found} columns but the header has 3"


# --- records against tasks --------------------------------------------------------------------


def _records(tmp_path, rows) -> list:
    return read_records(_write(tmp_path / "d.jsonl", _jsonl(rows)))


def test_missing_field_names_it_and_lists_the_fields_present(tmp_path):
    records = _records(tmp_path, [ROWS[0], {"id": "c", "text": "Hi.", "target": "Hallo."}])
    msg = _error(make_examples, get_task("translation"), records)
    assert msg == (f"{tmp_path / 'd.jsonl'}:2: missing field 'source'; fields present: "
                   f"id, text, target")


@pytest.mark.parametrize("row, match", [
    ({"source": 42, "target": "x"}, r":1: field 'source' must be text, got a number \(42\)"),
    ({"source": True, "target": "x"}, r":1: field 'source' must be text, got bool"),
    ({"source": ["a"], "target": "x"}, r":1: field 'source' must be text, got list"),
    ({"source": "a", "target": 3}, r":1: field 'target' must be text or a list of text, got int"),
    ({"source": "  ", "target": "x"}, r":1: field 'source' is empty"),
    ({"source": "a", "target": ""}, r":1: field 'target' must hold non-empty text"),
    ({"source": "a", "target": []}, r":1: field 'target' must hold non-empty text \(a list"),
])
def test_wrong_types_and_empty_fields(tmp_path, row, match):
    msg = _error(make_examples, get_task("translation"), _records(tmp_path, [row]))
    assert msg.startswith(str(tmp_path / "d.jsonl") + ":1:")
    assert re.search(match, msg), msg


@pytest.mark.parametrize("answers, match", [
    ({"text": ["Paris"]}, "must be text or a list of text, got dict"),
    (7, "must be text or a list of text, got int"),
    (["Paris", 3], r"must hold non-empty text \(a list of strings\)"),
])
def test_qa_answers_must_be_a_list_of_text(tmp_path, answers, match):
    row = {"context": "Paris is in France.", "question": "Where?", "answers": answers}
    msg = _error(make_examples, get_task("qa"), _records(tmp_path, [row]))
    assert re.search(match, msg) and msg.startswith(f"{tmp_path / 'd.jsonl'}:1:")


def test_qa_answers_list_gives_references(tmp_path):
    row = {"context": "Paris is in France.", "question": "Where?", "answers": ["France", "FR "]}
    (ex,) = make_examples(get_task("qa"), _records(tmp_path, [row]))
    assert ex.target == "France" and ex.references == ["France", "FR"]
    assert render_input(get_task("qa"), ex) == ("Context: Paris is in France.\nQuestion: Where?"
                                                 "\nAnswer:")


def test_unknown_task_name():
    msg = _error(get_task, "poetry")
    assert "unknown task 'poetry'" in msg and "translation" in msg
    assert "--template" in _error(get_task)


def test_field_remapping_and_dotted_paths(tmp_path):
    rows = [{"article": "A long text about dogs.", "highlights": "Dogs."}]
    task = get_task("summarization",
                    field_map=parse_field_map(["source=article", "target=highlights"]))
    (ex,) = make_examples(task, _records(tmp_path, rows))
    assert ex.fields == {"source": "A long text about dogs."} and ex.target == "Dogs."
    assert render_input(task, ex) == "A long text about dogs.\nSummary:"

    squad = [{"context": "Paris is in France.", "question": "Where is Paris?",
              "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}]
    task = get_task("qa", field_map=parse_field_map(["answers=answers.text"]))
    (ex,) = make_examples(task, _records(tmp_path, squad))
    assert ex.references == ["France", "in France"]

    # A mapped path that is missing says where it was mapped from.
    task = get_task("qa", field_map=parse_field_map(["answers=answers.txt"]))
    msg = _error(make_examples, task, _records(tmp_path, squad))
    assert "missing field 'answers.txt' (mapped from --field answers=answers.txt)" in msg
    assert "fields present: context, question, answers" in msg


def test_custom_task_from_yaml_file(tmp_path):
    path = _write(tmp_path / "task.yaml", "name: sentiment\n"
                                          "template: \"Review: {review}\\nSentiment:\"\n"
                                          "target_field: label\n"
                                          "stop: \"\\n\"\n"
                                          "max_new_tokens: 4\n")
    task = get_task(str(path))
    assert task == load_task_file(str(path))
    assert (task.name, task.target_field, task.stop, task.max_new_tokens) == (
        "sentiment", "label", "\n", 4)
    (ex,) = make_examples(task, _records(tmp_path, [{"review": "Great!", "label": "good"}]))
    assert render_input(task, ex) == "Review: Great!\nSentiment:" and ex.target == "good"
    # Command-line overrides still apply on top of the file.
    assert get_task(str(path), stop="").stop is None


@pytest.mark.parametrize("content, match", [
    ("name: x\ntemplate: '{a}'\n", "non-empty string 'target_field'"),
    ("name: x\ntemplate: '{a}'\ntarget_field: b\ncolour: red\n", r"unknown task keys \['colour'\]"),
    ("- a\n- b\n", "must be a mapping"),
    ("name: [unclosed\n", "cannot parse task file"),
    ("name: x\ntemplate: '{a'\ntarget_field: b\n", "is malformed"),
])
def test_bad_task_files(tmp_path, content, match):
    path = _write(tmp_path / "task.yaml", content)
    assert re.search(match, _error(get_task, str(path)))


def test_task_file_that_is_not_utf8(tmp_path):
    path = _write(tmp_path / "task.yaml", b"name: caf\xe9\n")
    assert "cannot parse task file" in _error(get_task, str(path))
    assert "task file not found" in _error(load_task_file, str(tmp_path / "none.yaml"))


def test_template_with_unknown_placeholder_reports_the_missing_field(tmp_path):
    task = get_task(template="{source}\n{extra}\nOut:", target_field="target")
    msg = _error(make_example, task, _records(tmp_path, [ROWS[0]])[0])
    assert msg == (f"{tmp_path / 'd.jsonl'}:1: missing field 'extra'; fields present: "
                   f"id, source, target")


@pytest.mark.parametrize("template, match", [
    ("{source", "malformed"), ("{0} out", "must be a field name"), ("{} out", "must be a field"),
    ("{source!r}", "format spec"), ("{source:>10}", "format spec"),
])
def test_bad_templates(template, match):
    assert re.search(match, _error(validate_template, template))
    assert re.search(match, _error(get_task, template=template, target_field="target"))


def test_custom_template_overrides_a_preset():
    task = get_task("translation", template="{source} =>")
    assert task.template == "{source} =>" and task.truncate_field == "source"
    task = get_task("translation", template="{text} =>", target_field="de")
    assert task.truncate_field is None and task.target_field == "de"
    assert Task.from_dict(task.to_dict()) == task


@pytest.mark.parametrize("items, expected", [
    (None, {}), ([], {}),
    (["source=article"], {"source": "article"}),
    ([" answers = answers.text "], {"answers": "answers.text"}),
    (["a=b", "a=c"], {"a": "c"}),
])
def test_parse_field_map(items, expected):
    assert parse_field_map(items) == expected


@pytest.mark.parametrize("item", ["source", "=article", "source=", " = ", "source =  "])
def test_parse_field_map_errors(item):
    msg = _error(parse_field_map, [item])
    assert msg.startswith(f"--field {item!r} must look like NAME=RECORD_FIELD")


# --- Hugging Face sources: an explicit split, always (#10, defect 3) ----------------------------


class _Hub:
    """Stands in for the ``datasets`` package (not installed here; no network in tests): records
    each ``load_dataset`` call and answers with ``rows``, or fails like an offline hub."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows, self.calls = rows, []

    def load_dataset(self, name, config=None, split=None):
        self.calls.append((name, config, split))
        if self.rows is None:
            raise ConnectionError("hub offline")
        return self.rows


@pytest.fixture
def hub(monkeypatch):
    fake = _Hub()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


def test_hub_source_without_a_split_is_refused(hub):
    message = _error(read_records, "hf:org/data")
    assert message == ("hf:org/data: a Hugging Face dataset needs an explicit split (train, "
                       "validation, test, ...), e.g. --test-split test")
    assert hub.calls == []


def test_hub_split_is_passed_and_recorded_in_the_origin(hub):
    hub.rows = ROWS
    records = read_records("hf:org/data:de-en", "validation", limit=1)
    assert hub.calls == [("org/data", "de-en", "validation")]
    assert records == ROWS[:1] and records[0].origin == "hf:org/data:de-en[validation]:0"


def test_split_is_ignored_for_local_files(tmp_path):
    path = _write(tmp_path / "d.jsonl", _jsonl(ROWS))
    assert read_records(path, "test") == read_records(path) == ROWS


def test_hub_error_names_the_split(hub):
    assert _error(read_records, "hf:org/data", "dev") == (
        "hf:org/data (split 'dev'): cannot load dataset (hub offline); without the hub, "
        "export it to JSONL and pass the file")


LOCAL = str(Path(__file__).resolve().parents[1] / "src/softprompt/samples/translation/test.jsonl")
# command line -> the split each hf: source is read with (in reading order)
SPLIT_FLAGS = [
    (["train", "--train", "hf:org/data"], ["train"]),
    (["train", "--train", "hf:org/data", "--train-split", "de"], ["de"]),
    (["train", "--train", "hf:org/data", "--split", "de"], ["de"]),  # the old name
    (["train", "--train", LOCAL, "--validation", "hf:org/data"], ["validation"]),
    (["train", "--train", LOCAL, "--validation", "hf:org/data", "--validation-split", "dev"],
     ["dev"]),
    (["evaluate", "--hard", "x", "--test", "hf:org/data"], ["test"]),
    (["evaluate", "--hard", "x", "--test", "hf:org/data", "--test-split", "dev"], ["dev"]),
    (["compare", "--train", LOCAL, "--test", "hf:org/data"], ["test"]),
    (["compare", "--train", LOCAL, "--test", "hf:org/data", "--test-split", "v2"], ["v2"]),
    (["compare", "--train", "hf:org/data", "--test", LOCAL], ["train"]),
    (["compare", "--train", "hf:org/data", "--test", LOCAL, "--train-split", "x"], ["x"]),
    (["compare", "--train", LOCAL, "--validation", "hf:org/data", "--test", LOCAL],
     ["validation"]),
    (["compare", "--train", LOCAL, "--validation", "hf:org/data", "--test", LOCAL,
      "--validation-split", "dev"], ["dev"]),
    (["generate", "--prompt", "no-prompt", "--file", "hf:org/data"], ["test"]),
    (["generate", "--prompt", "no-prompt", "--file", "hf:org/data", "--file-split", "x"], ["x"]),
]


@pytest.mark.parametrize("argv, splits", SPLIT_FLAGS, ids=[" ".join(a) for a, _ in SPLIT_FLAGS])
def test_split_flags_reach_the_hub_reader(hub, tmp_path, capfd, argv, splits):
    """Before any model load: the hub reader is asked for the split the flag names."""
    from softprompt.cli import main

    if argv[0] != "generate":
        argv = [*argv, "--task", "translation", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--model" if argv[0] != "compare" else "--models", "no-such-model"])
    err = capfd.readouterr().err
    assert info.value.code == 2
    assert err == (f"error: hf:org/data (split {splits[0]!r}): cannot load dataset (hub "
                   f"offline); without the hub, export it to JSONL and pass the file\n")
    assert hub.calls == [("org/data", None, split) for split in splits]
