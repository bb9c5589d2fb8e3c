"""Atomic outputs: everything is written into a hidden temp folder beside the target and renamed at the
end, so a failed or interrupted run never leaves a half-written checkpoint or export that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Optional

from mogu_jax.errors import MoguError


def check_output_dir(out_dir: str, overwrite: bool, same: Optional[Callable[[str], bool]] = None) -> bool:
    """Fail fast before any work. Returns True when ``out_dir`` already holds the same result (``same``)."""
    if not os.path.exists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise MoguError(f"output {out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return False
    if same is not None and same(out_dir) and not overwrite:
        return True
    if not overwrite:
        raise MoguError(f"output directory {out_dir} already holds a different checkpoint or other files; "
                        "choose another directory or pass --overwrite")
    return False


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir; on success it replaces ``out_dir``; on any error it is removed."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
            raise MoguError(f"output directory {out_dir} appeared while writing; pass --overwrite to replace it")
        trash = None
        if os.path.exists(out_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(trash, "old"))
        os.rename(tmp, out_dir)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_text_file(path: str, expected: str = "a text file") -> str:
    """A UTF-8 text file's content, or a MoguError naming the file (missing, a folder, not UTF-8, empty)."""
    if not os.path.exists(path):
        raise MoguError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MoguError(f"{path}: is a directory, expected {expected}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MoguError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MoguError(f"{path}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise MoguError(f"{path}: file is empty")
    return text
