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
MAX_RECORD_CHARS = 1 << 20  # 1M characters (~250k tokens): far beyond any model's context


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
        _check_size(path, number, len(line))
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


def _check_size(path: Path, number: int, size: int) -> None:
    if size > MAX_RECORD_CHARS:
        raise SoftPromptError(f"{path}:{number}: record is {size / 1e6:.1f}M characters, over "
                              f"the {MAX_RECORD_CHARS / 1e6:.1f}M limit; cut the text first "
                              f"(only --max-length tokens are used anyway)")


def _read_csv(path: Path) -> list[Record]:
    text = _decode(path)
    csv.field_size_limit(MAX_RECORD_CHARS)
    reader = csv.DictReader(io.StringIO(text))
    records = []
    try:
        for row in reader:
            number = reader.line_num
            if None in row or any(v is None for v in row.values()):
                # DictReader pads a short row with None values and puts extra cells under None.
                found = (sum(v is not None for k, v in row.items() if k is not None)
                         + len(row.get(None) or []))
                raise SoftPromptError(f"{path}:{number}: row has {found} columns but the "
                                      f"header has {len(reader.fieldnames)}")
            records.append(_record(dict(row), f"{path}:{number}"))
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise SoftPromptError(f"{path}:{reader.line_num + 1}: a field is over the "
                                  f"{MAX_RECORD_CHARS / 1e6:.1f}M character limit; cut the text "
                                  f"first (only --max-length tokens are used anyway)") from None
        raise SoftPromptError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return records


def _read_hf(spec: str, split: str) -> list[Record]:
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise SoftPromptError(f"{spec} (split {split!r}): Hugging Face datasets need `pip "
                              f"install 'softprompt[hf]'`") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # hub / network / unknown-split errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SoftPromptError(f"{spec} (split {split!r}): cannot load dataset ({first}); "
                              f"without the hub, export it to JSONL and pass the file") from None
    return [_record(dict(row), f"{spec}[{split}]:{i}") for i, row in enumerate(ds)]


def read_records(source: str | Path, split: str | None = None,
                 limit: int | None = None) -> list[Record]:
    """Read a dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.csv`` path, or ``hf:NAME[:CONFIG]``.
        split: the split of a Hugging Face dataset (``train``, ``validation``, ``test``, ...);
            required for ``hf:`` sources, ignored for files.
        limit: keep only the first ``limit`` records (None: all).

    Raises:
        SoftPromptError: missing file, bad encoding, malformed rows, no records, a hub source
            without a split, or a limit below 1.
    """
    source = str(source)
    if limit is not None and limit < 1:
        raise SoftPromptError(f"{source}: the record limit must be positive, got {limit!r}")
    if source.startswith(HF_PREFIX):
        if not split:
            raise SoftPromptError(f"{source}: a Hugging Face dataset needs an explicit split "
                                  f"(train, validation, test, ...), e.g. --test-split test")
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
    return records if limit is None else records[:limit]
