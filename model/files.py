"""Atomic file writes: the one helper every file the project writes goes through.

A file appears complete under its real name or not at all: it is written to a hidden temp file in
the same folder (so the final os.replace is an atomic rename) that a crash or an error removes.
Whatever library writes the temp file (safetensors writes 0600), the result gets the permissions
of any file the user creates: 0666 minus the umask.
"""
import os
import uuid
from contextlib import contextmanager
from typing import Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)     # reading the umask means setting it: put it straight back


class WriteError(ValueError):
    """An output path that cannot be written; the message names the path and the fix."""


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it replaces `path`, on any error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        open(tmp, "xb").close()
    except OSError as error:
        raise WriteError(f"cannot write {path}: {folder} is not a writable folder ({error.strerror}): "
                         "choose another output path") from error
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path: str) -> None:
    """Fail early (before hours of work) if `path` could not be written: create and remove a temp file."""
    with atomic_path(path + ".probe"):
        pass
    os.remove(path + ".probe")


def write_section(path: str, text: str, begin: str, end: str) -> None:
    """Replace what stands between the `begin` and `end` marker lines of a text file, atomically.

    How the measuring scripts (eval.py, bench.py --plan) keep their tables in the docs up to date.
    """
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise ValueError(f"{path} has no {begin} ... {end} section to fill: add the two marker lines")
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
