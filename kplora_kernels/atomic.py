"""The one atomic file writer of the package: every checkpoint, cache file and run record goes through
:func:`write_atomically`, so a reader sees the old file or the new one, never a partial one, and a
crash (a killed process) leaves at most a temp file that the next write to the same path removes."""
from __future__ import annotations

import os
import secrets
from typing import Callable


def _temp_prefix(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.kplora.tmp-")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temp files that earlier writes to ``path`` left behind when their process died
    (``.<name>.kplora.tmp-<pid>-<token>`` beside ``path``); returns the names removed. Temps of
    processes still running (a concurrent writer) are left alone."""
    prefix = _temp_prefix(path)
    directory, stem = os.path.split(prefix)
    removed = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.startswith(stem):
            continue
        pid = entry[len(stem):].split("-", 1)[0]
        alive = pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid))
        if not alive:
            try:
                os.remove(os.path.join(directory, entry))
                removed.append(entry)
            except FileNotFoundError:
                pass
    return removed


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: "str | os.PathLike", write: Callable[[str], None], *, what: str = "file") -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file beside it, which is fsynced, renamed
    over ``path``, and the folder fsynced; stale temps of dead writers are removed first.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        OSError: the file cannot be written (a read-only folder, a full disk), naming ``path`` and
            the cause; the temp file is removed and ``path`` is unchanged.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write the {what} {path!r}: its folder {directory} does not exist")
    remove_stale_temps(path)
    tmp = f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as exc:  # safetensors, torch.save and the OS raise their own types
            raise OSError(f"cannot write the {what} {path!r} (folder {directory}): "
                          f"{type(exc).__name__}: {exc}") from exc
        _fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
