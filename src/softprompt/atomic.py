"""Crash-safe writes: temporary file, flush, fsync, rename.

A process killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from softprompt.faults import crash_point


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("write")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomically write ``rows`` as JSON lines."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success, rename it to ``final``.

    ``final`` must not exist yet (a directory rename cannot atomically replace a full one);
    if it appears meanwhile (a concurrent writer), the staged copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | Path, flag: str = "--output", directory: bool = True) -> None:
    """Refuse an output that cannot be written, before any slow work.

    ``path`` is a directory to create (``directory``) or a file to write. Its nearest existing
    ancestor must be a writable directory; this is tried for real (a temporary directory made
    and removed there), so read-only mounts and pseudo filesystems such as /proc are caught.

    Raises:
        SoftPromptError: one line naming ``flag`` and the path.
    """
    from softprompt.errors import SoftPromptError

    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise SoftPromptError(f"{flag} {path} is a file; give a directory")
        if not directory and path.is_dir():
            raise SoftPromptError(f"{flag} {path} is a directory; give a file path")
    probe_in = path if directory and path.is_dir() else path.parent
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise SoftPromptError(f"{flag} {path}: cannot create it, {probe_in} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe_in, prefix=".softprompt-write-test-"))
    except OSError as exc:
        raise SoftPromptError(f"{flag} {path}: cannot write in {probe_in} "
                              f"({exc.strerror or exc}); choose another path") from None
