"""Files in and out. Every output is written into a hidden temp folder or file beside the target and renamed
at the end (``atomic_dir``, ``write_file_atomic``), so a failed or interrupted run never leaves a half-written
output that looks complete; ``read_json_records`` is the project's one JSON lines reader."""

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
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise MoguError("empty output directory path")
    if not os.path.exists(out_dir):
        _check_parent(out_dir)
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


def write_file_atomic(path: str | os.PathLike, content: str | bytes | Callable[[str], None],
                      overwrite: bool = True) -> str:
    """Write one file through a hidden temp file beside it, renamed over ``path`` at the end, so a failure or
    interrupt leaves either the old file or nothing. ``content``: text (UTF-8), bytes, or a function that
    writes the temp path it is given (it keeps ``path``'s extension, e.g. for ``np.savez``)."""
    path = os.path.abspath(os.fspath(path))
    check_output_file(path, overwrite)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=os.path.splitext(path)[1], dir=d)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool, option: str = "output") -> None:
    """Fail fast, before any work, when ``path`` cannot take an output file: a folder, a parent that is a
    file, or an existing file without ``overwrite``."""
    path = os.fspath(path)
    if not path or not os.path.basename(os.path.abspath(path)) or path.endswith(os.sep):
        raise MoguError(f"{option} {path!r}: expected a file path")
    if os.path.isdir(path):
        raise MoguError(f"{option} {path} is a directory; expected a file path")
    _check_parent(path, option)
    if os.path.exists(path) and not overwrite:
        raise MoguError(f"{option} {path} already exists; pass --overwrite to replace it")


def _check_parent(path: str, option: str = "output") -> None:
    """The nearest existing folder above ``path`` is a folder (not a file) that we can write into."""
    if len(os.fsencode(os.path.abspath(path))) >= 4096 or any(
            len(os.fsencode(part)) > 255 for part in os.path.abspath(path).split(os.sep)):
        raise MoguError(f"{option} {path[:80]}...: path or file name too long for the file system")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise MoguError(f"{option} {path}: {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise MoguError(f"{option} {path}: cannot write into {parent} (permission denied)")


def write_json_atomic(path: str, obj, overwrite: bool = True) -> str:
    return write_file_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", overwrite)


def write_jsonl_atomic(path: str, rows, overwrite: bool = True) -> str:
    return write_file_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), overwrite)


def read_text_file(path: str, expected: str = "a text file") -> str:
    """A UTF-8 text file's content, or a MoguError naming the file (missing, a folder, binary, not UTF-8,
    empty)."""
    path = os.fspath(path)
    if not path:
        raise MoguError(f"empty path given where {expected} is expected")
    if not os.path.exists(path):
        raise MoguError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MoguError(f"{path}: is a directory, expected {expected}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MoguError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), expected {expected}") from None
    except OSError as e:
        raise MoguError(f"{path}: cannot read: {e.strerror or e}") from None
    if "\x00" in text:
        raise MoguError(f"{path}: a binary file (NUL byte at {text.index(chr(0))}), expected {expected}")
    if not text.strip():
        raise MoguError(f"{path}: file is empty")
    return text


def read_json_records(path: str, expected: str = "a JSON or JSONL file",
                      text: Optional[str] = None) -> tuple[list, list[str]]:
    """The project's one reader of JSON lines (or a JSON list): -> (values, location labels). Locations are
    ``row N`` (``row N (line M)`` where blank lines make them differ); every error names the file and line.
    ``text``: the file's content when the caller has already read it with ``read_text_file``."""
    path = os.fspath(path)
    if text is None:
        text = read_text_file(path, expected)
    values: list = []
    locs: list[str] = []
    if text.lstrip().startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoguError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except (RecursionError, ValueError) as e:
            raise MoguError(f"{path}: unreadable JSON: {_short(e)}") from None
        values = list(obj)
        locs = [f"row {i + 1}" for i in range(len(values))]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MoguError(f"{path}: invalid JSON at line {lineno} column {e.colno}: {e.msg}") from None
            except (RecursionError, ValueError) as e:
                raise MoguError(f"{path}: line {lineno}: unreadable JSON: {_short(e)}") from None
            n = len(values)
            locs.append(f"row {n}" if n == lineno else f"row {n} (line {lineno})")
    if not locs:
        raise MoguError(f"{path}: contains no rows")
    return values, locs


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
