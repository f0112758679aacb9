"""Safe output directories: never overwrite user data, never leave a half-written directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["OutputExistsError", "atomic_dir", "check_out_dir", "inputs_inside", "local_or_name"]


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty."""


def local_or_name(name: str | None) -> str | None:
    """A path that exists here, made absolute (a run records where its inputs are, wherever it is read from);
    anything else (a hub name, a number, ``auto``) as given."""
    if not name or not os.path.exists(name):
        return name
    return os.path.abspath(name)


def inputs_inside(out: str | Path, inputs) -> list[str]:
    """The inputs, given as ``(what, path)`` pairs, that are ``out`` itself or lie inside it: as written, or once
    links are followed. A path that does not exist (a hub name, a number) holds nothing to lose.

    Folders are resolved once each, so that 100k image paths cost about one ``lstat`` each.
    """
    folders = {os.path.abspath(out), os.path.realpath(out)}
    real_dirs: dict[str, str] = {}

    def within(path: str) -> bool:
        return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)

    found = []
    for what, path in inputs:
        if not isinstance(path, (str, os.PathLike)) or not str(path) or not os.path.lexists(path):
            continue
        written = os.path.abspath(path)
        parent, name = os.path.split(written)
        if parent not in real_dirs:
            real_dirs[parent] = os.path.realpath(parent)
        real = os.path.realpath(written) if os.path.islink(written) else os.path.join(real_dirs[parent], name)
        if within(written) or within(real):
            found.append(f"{what} {path}")
    return found


def check_out_dir(path: str | Path, force: bool, flag: str = "--force") -> Path:
    """Refuse an existing non-empty directory (or a file) unless ``force``.

    Raises:
        OutputExistsError: ``path`` is a non-empty directory or a file and ``force`` is off.
    """
    path = Path(path)
    if path.is_file():
        raise OutputExistsError(f"output {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"output directory {path} exists and is not empty; pass {flag} to replace it")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False, flag: str = "--force"):
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    An interrupted or failed run leaves ``path`` as it was (absent, or the old
    contents when ``force`` was given) and removes the temporary directory.

    Raises:
        OutputExistsError: as :func:`check_out_dir`.
    """
    path = check_out_dir(path, force, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
