"""Atomic file writes: write to a temp file in the same directory, then ``os.replace``."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _new_temp(target: Path) -> Path:
    """Create an empty, uniquely named temp file beside ``target`` (mode 0o666 minus the umask)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temp file beside {target}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; move it onto ``path`` only if the block succeeds.

    Parent directories are created. On error the temp file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (flushed and, unless ``fsync=False``, fsynced before the rename;
    datasets of many small files skip the fsync)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: which path, what went wrong, what to do."""
    path = exc.filename if exc.filename is not None else ""
    where = f"{path}: " if path else ""
    errno_ = exc.errno
    if isinstance(exc, FileExistsError) or errno_ == errno.EEXIST:
        fix = "a file is in the way of a folder; choose another --out or remove the file"
    elif isinstance(exc, NotADirectoryError) or errno_ == errno.ENOTDIR:
        fix = "a part of the path is a file, not a folder; choose another --out"
    elif isinstance(exc, IsADirectoryError) or errno_ == errno.EISDIR:
        fix = "this is a folder; give a file name"
    elif isinstance(exc, PermissionError) or errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "not allowed to write here; choose a folder you can write to (e.g. --out out/)"
    elif errno_ == errno.ENAMETOOLONG:
        fix = "the name is too long; choose a shorter path"
    elif errno_ == errno.ENOSPC:
        fix = "the disk is full; free space or choose another --out"
    elif isinstance(exc, FileNotFoundError):
        fix = "no such file or folder; check the path"
    else:
        fix = "check the path and its permissions"
    reason = exc.strerror or type(exc).__name__
    return f"{where}{reason}: {fix}"


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create ``path`` (and parents) as an output folder and check that files can be written in it, before any
    work starts; a ``ConvscopeError`` names the problem and the fix otherwise."""
    from ..errors import ConvscopeError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConvscopeError(f"{flag} {out}: is a file, not a folder; choose a folder name (it is created) or "
                             "remove the file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = _new_temp(out / "write-check")
        probe.unlink()
    except OSError as exc:
        raise ConvscopeError(f"{flag} {out}: {describe_os_error(exc)}") from None
    return out


def check_output_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """The same check for an output file: its folder is created and writable, and the path is not a folder."""
    from ..errors import ConvscopeError

    out = Path(path)
    if out.is_dir():
        raise ConvscopeError(f"{flag} {out}: is a folder; give a file name such as {out / 'decoder.pt'}")
    check_output_dir(out.parent if str(out.parent) else ".", flag=f"{flag} {out}: the folder")
    return out
