"""Property tests: no input may crash the loader or the template filler with anything but
the tool's own error (SoftPromptError)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.data import read_records
from softprompt.errors import SoftPromptError
from softprompt.tasks import PRESETS, get_task, make_examples, render_input

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)
field_names = st.sampled_from(["source", "target", "context", "question", "answers", "id", "x"])
records = st.dictionaries(field_names, json_values, max_size=6)


def _load_all_tasks(path: Path) -> None:
    """Read the file and validate it against every preset; only our error may escape."""
    try:
        rows = read_records(path)
    except SoftPromptError:
        return
    for name in PRESETS:
        task = get_task(name)
        try:
            for ex in make_examples(task, rows):
                render_input(task, ex, task.instruction)
        except SoftPromptError:
            pass


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_arbitrary_bytes_never_crash_the_loader(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        _load_all_tasks(path)


@FUZZ
@given(st.lists(records, min_size=1, max_size=4))
def test_arbitrary_records_never_crash_validation(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        _load_all_tasks(path)


@FUZZ
@given(st.text(max_size=40), st.dictionaries(field_names, st.text(max_size=10), max_size=4))
def test_arbitrary_templates_never_crash_the_filler(template, record):
    try:
        task = get_task(template=template, target_field="target")
        for ex in make_examples(task, [{"target": "t", **record}]):
            render_input(task, ex)
    except SoftPromptError:
        pass
