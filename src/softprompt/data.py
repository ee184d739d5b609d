"""Read records from JSONL, JSON, CSV files or Hugging Face datasets, with file:line errors.

A record is a flat ``dict`` as stored; tasks.py maps and validates its fields.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from softprompt.errors import SoftPromptError

HF_PREFIX = "hf:"


class Record(dict):
    """A data row that remembers where it came from (``origin``: ``file:line``)."""

    origin: str = "?"


def _record(row: dict[str, Any], origin: str) -> Record:
    rec = Record(row)
    rec.origin = origin
    return rec


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 BOM is accepted
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SoftPromptError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}); re-save the "
                              f"file as UTF-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(io.StringIO(_decode(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SoftPromptError(f"{path}:{number}: invalid JSON ({exc.msg} at column "
                                  f"{exc.colno}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise SoftPromptError(f"{path}:{number}: expected a JSON object, got "
                                  f"{type(row).__name__}; each line must be one object "
                                  f"like {{\"source\": ..., \"target\": ...}}")
        records.append(_record(row, f"{path}:{number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise SoftPromptError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise SoftPromptError(f"{path}: a .json file must hold a list of objects; use JSONL for "
                              f"one object per line")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise SoftPromptError(f"{path}: item {i} is {type(row).__name__}, expected an object")
    return [_record(row, f"{path}:item {i}") for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[Record]:
    text = _decode(path)
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        return []
    records = []
    for row in reader:
        number = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise SoftPromptError(f"{path}:{number}: row has {len(row) - (None in row)} "
                                  f"columns but the header has {len(reader.fieldnames)}")
        records.append(_record(dict(row), f"{path}:{number}"))
    return records


def _read_hf(spec: str, split: str | None) -> list[Record]:
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise SoftPromptError(f"{spec}: Hugging Face datasets need `pip install "
                              f"'softprompt[hf]'`") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # hub / network / unknown-split errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SoftPromptError(f"{spec}: cannot load dataset ({first}); without the hub, export "
                              f"it to JSONL and pass the file") from None
    return [_record(dict(row), f"{spec}[{split or 'train'}]:{i}") for i, row in enumerate(ds)]


def read_records(source: str | Path, split: str | None = None,
                 limit: int | None = None) -> list[Record]:
    """Read a dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.csv`` path, or ``hf:NAME[:CONFIG]``.
        split: split name for Hugging Face datasets (default ``train``).
        limit: keep only the first ``limit`` records.

    Raises:
        SoftPromptError: missing file, bad encoding, malformed rows, or no records.
    """
    source = str(source)
    if source.startswith(HF_PREFIX):
        records = _read_hf(source, split)
    else:
        path = Path(source)
        if not path.is_file():
            raise SoftPromptError(f"{path}: file not found" if not path.exists()
                                  else f"{path}: not a file")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            records = _read_csv(path)
        elif suffix == ".json":
            records = _read_json(path)
        else:
            records = _read_jsonl(path)
    if not records:
        raise SoftPromptError(f"{source}: no records found; the dataset is empty")
    return records[:limit] if limit else records


def samples_dir() -> Path:
    """The sample datasets shipped with the package (written by us, MIT)."""
    return Path(__file__).parent / "samples"
