"""Atomic writes: a file or directory is built under a unique temporary sibling name and
moved into place with os.replace, so a reader never sees half of it and a failure leaves
nothing behind."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique hidden name next to `path` (same directory, so os.replace is a rename)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "xb"):
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on any
    error it is removed. The sibling is opened with "x" (not mkstemp, whose files are 0600)
    so the file gets the usual mode."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
