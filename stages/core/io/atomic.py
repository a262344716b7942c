"""Atomic writes and folder ownership: every file nvf writes goes to a temp file beside the target and
is renamed into place; a folder is replaced or removed only when nvf wrote every file in it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temp name keeps the suffix (libraries such as Open3D pick the format from it) and starts
    with ``.`` plus ends in ``.tmp-<suffix>`` so that half-written files are easy to spot and are
    never mistaken for outputs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


OWNED_MARK = ".nvf-owned.json"
"""The file in every folder nvf writes whole (`atomic_dir`, `claim_dir`): the files nvf put there.
A folder is replaced or removed only when every file in it is listed (nvf deletes nothing it did
not write); ``{"all": true}`` marks a folder nvf made for a tool that fills it (nerfstudio's run)."""


def foreign_files(folder: str | os.PathLike) -> list[Path]:
    """Files under ``folder`` that nvf did not write: every file when it has no `OWNED_MARK`, else
    those its mark does not list. [] for a folder that does not exist, or that holds no file."""
    folder = Path(folder)
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if not p.is_dir() and p != folder / OWNED_MARK)
    try:
        mark = json.loads((folder / OWNED_MARK).read_text(encoding="utf-8"))
        if mark.get("all") is True:
            return []
        listed = set(mark.get("files", []))
    except (OSError, ValueError, AttributeError):  # no mark, or not nvf's: nothing in it is nvf's
        listed = set()
    return [p for p in files if p.relative_to(folder).as_posix() not in listed]


def check_replaceable(folder: str | os.PathLike, what: str = "folder") -> None:
    """Raise InputError (naming a file) when ``folder`` holds a file nvf did not write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a {what}: pass a new or empty folder")
    foreign = foreign_files(folder)
    if foreign:
        raise InputError(
            f"{folder} holds {len(foreign)} file(s) nvf did not write (e.g. {foreign[0].relative_to(folder)}): "
            f"nvf replaces only its own outputs; pass a new or empty {what}"
        )


def remove_owned_dir(folder: str | os.PathLike) -> None:
    """Remove a folder nvf wrote (`check_replaceable` first: a foreign file refuses, nothing is removed)."""
    import shutil

    folder = Path(folder)
    check_replaceable(folder)
    if folder.exists():
        shutil.rmtree(folder)


def claim_dir(folder: str | os.PathLike) -> Path:
    """Make ``folder`` (new or empty, else refused) a folder nvf owns whole, for a tool to fill."""
    folder = Path(folder)
    check_replaceable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNED_MARK).write_text(json.dumps({"all": True}) + "\n", encoding="utf-8")
    return folder


def _mark_owned(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    (folder / OWNED_MARK).write_text(json.dumps({"files": files}, indent=0) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, mark: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it takes the place of ``path``.

    ``path`` may be absent, empty, or a folder nvf wrote (`OWNED_MARK` lists every file in it);
    any other folder is refused with an InputError before the body runs (and again before the
    swap), so nvf never deletes a file it did not write. With ``mark`` the new folder lists its
    files in `OWNED_MARK`. The swap renames the old folder aside, the new one in, then removes the
    old: a kill between the two renames leaves ``path`` absent (never half old, half new) and two
    temp folders that `worktree.clean_stale_temp` removes.
    """
    import shutil

    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if mark:
            _mark_owned(tmp)
        if path.exists():
            check_replaceable(path)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old)  # onto the empty temp folder: rename(2) replaces an empty folder
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def record_set(mark: str | os.PathLike) -> Iterator[Path]:
    """Write files that belong together, one convention everywhere (cloud.ply + cloud_metrics.json;
    sparse + transforms.json + colmap/ + poses.safetensors; a reconstruction + recon_metrics.json).

    ``mark`` is the set's completion mark, the one file reruns and readers trust: it is removed
    first, then the body writes the other members (each atomically) and the mark last. A kill at
    any point leaves the whole new set, or members without a mark (a rerun redoes them), never a
    mark beside a member written by another run. The body must write the mark.
    """
    mark = Path(mark)
    mark.unlink(missing_ok=True)
    yield mark
    if not mark.is_file():
        raise RuntimeError(f"{mark}: a record set was written without its completion mark")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically; returns its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
