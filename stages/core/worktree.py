"""The work tree every per-capture stage reads and writes, and how a stage walks its captures.

Layout: ``WORK/<capture>/<kind>.safetensors`` (poses, sparse, depth, masks, aligned, embed) plus the PLYs
and JSON a stage adds there. A stage processes the captures of a `DatasetIndex`, restricted to a
shard and optionally to a list of capture ids, and skips a capture whose output already carries
the same input hash (inputs + config) unless told to overwrite.

Convention: ``--shard K/N`` with 0 <= K < N (SLURM: ``--array=0-(N-1)``). Subjects are sorted and
dealt round-robin, so a person never straddles shards and the union of all shards is everything.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.dataset import Capture
from stages.core.errors import InputError
from stages.core.io import read_record_metadata, read_record_names

RECORD_FILES = {
    "poses": "poses.safetensors",
    "sparse": "sparse.safetensors",
    "depth": "depth.safetensors",
    "aligned": "aligned.safetensors",
    "embed": "embed.safetensors",
    "masks": "masks.safetensors",
}


def capture_dir(work: str | os.PathLike, capture: str) -> Path:
    """``WORK/<capture>``."""
    return Path(work) / capture


def record_path(work: str | os.PathLike, capture: str, kind: str) -> Path:
    """Where a capture's record of ``kind`` lives in the work tree."""
    if kind not in RECORD_FILES:
        raise ValueError(f"unknown record kind '{kind}'")
    return capture_dir(work, capture) / RECORD_FILES[kind]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"K/N"`` -> Shard(K, N); None -> the whole set (or SLURM's array task when set)."""
        if text is None:
            return cls.from_env()
        index, _, count = text.partition("/")
        if not (index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(count):
            raise InputError(f"bad --shard '{text}': use K/N with 0 <= K < N, e.g. --shard 0/4")
        return cls(int(index), int(count))

    @classmethod
    def from_env(cls) -> Shard:
        """SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when both are set, else the whole set."""
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return cls()
        return cls.parse(f"{task}/{count}")

    def select(self, captures: Sequence[Capture]) -> list[Capture]:
        """The captures of this shard: subjects sorted and dealt round-robin."""
        if self.count == 1:
            return list(captures)
        subjects = sorted({c.subject for c in captures})
        mine = set(subjects[self.index :: self.count])
        return [c for c in captures if c.subject in mine]


def read_capture_ids(source: str | os.PathLike) -> list[str]:
    """Capture ids, one per line, from a file or ``-`` (stdin); blank lines and ``#`` comments skipped."""
    if str(source) == "-":
        lines: Iterable[str] = sys.stdin
    else:
        try:
            lines = Path(source).read_text().splitlines()
        except FileNotFoundError:
            raise InputError(f"{source}: capture list not found") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def select_captures(
    captures: Sequence[Capture], *, shard: Shard = Shard(), capture_ids: Sequence[str] | None = None
) -> list[Capture]:
    """Restrict to ``capture_ids`` (unknown ids are an error) and then to ``shard``."""
    if capture_ids is not None:
        by_id = {c.id: c for c in captures}
        unknown = [cid for cid in capture_ids if cid not in by_id]
        if unknown:
            raise InputError(
                f"{len(unknown)} capture id(s) not in the dataset, e.g. '{unknown[0]}'; `nvf scan DATA --list` lists them"
            )
        captures = [by_id[cid] for cid in dict.fromkeys(capture_ids)]
    return shard.select(captures)


def captures_with(work: str | os.PathLike, kind: str, how_to_make: str) -> list[Capture]:
    """The captures of a work tree holding a record of ``kind`` (sorted; subject from the record's
    metadata, else the folder name). InputError, ending with ``how_to_make`` (e.g. "run nvf depth
    DATA --out WORK first"), when ``work`` is not a folder or holds no such record."""
    work = Path(work)
    if not work.is_dir():
        raise InputError(f"{work}: no such work folder; {how_to_make}")
    found = []
    for path in sorted(work.glob(f"*/{RECORD_FILES[kind]}")):
        try:
            subject = read_record_metadata(path).get("subject") or path.parent.name
        except Exception:  # unreadable: the stage that loads it says so
            subject = path.parent.name
        found.append(Capture(path.parent.name, subject, ()))
    if not found:
        raise InputError(f"{work}: no <capture>/{RECORD_FILES[kind]} in it; {how_to_make}")
    return found


def is_up_to_date(path: str | os.PathLike, inputs_hash: str) -> bool:
    """True when ``path`` is an nvf record made from the same inputs and config (its ``inputs`` hash)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return read_record_metadata(path).get("inputs") == inputs_hash
    except Exception:  # an unreadable file is simply not up to date; the stage rewrites it
        return False


# What `io.atomic_path` / `io.atomic_dir` name their temp files and folders: ``.<name>.<8 random>.tmp[.<suffix>]``.
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def clean_stale_temp(root: str | os.PathLike, before: float, max_depth: int = 3) -> list[Path]:
    """Remove nvf temp files/folders (`TEMP_NAME`) under ``root`` last modified before ``before`` (epoch s).

    A process killed mid-write (kill -9, power loss) leaves its temp file behind; the outputs
    themselves are never partial (rename is atomic). Temp files younger than ``before`` may belong
    to a process still running and are kept. Looks ``max_depth`` folder levels deep; returns what it removed.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        stale = [name for name in (*files, *dirs) if TEMP_NAME.match(name)]
        dirs[:] = [d for d in dirs if d not in stale and depth + 1 < max_depth]
        for name in stale:
            path = Path(folder) / name
            try:
                if path.lstat().st_mtime >= before:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:  # its owner renamed or removed it meanwhile
                continue
            removed.append(path)
    return removed


def recorded_image_paths(poses_path: str | os.PathLike) -> dict[str, Path] | None:
    """Image name -> file, as a poses record lists them (``image_paths`` metadata, absolute); None
    when the record or the list is absent or a listed file no longer exists."""
    import json

    path = Path(poses_path)
    try:
        meta = read_record_metadata(path) if path.is_file() else {}
        paths = [Path(p) for p in json.loads(meta.get("image_paths", "null")) or []]
        names = read_record_names(path) if path.is_file() else []
    except Exception:  # an unreadable record: the caller falls back to --data or transforms.json
        return None
    if not paths or len(paths) != len(names) or not all(p.is_file() for p in paths):
        return None
    return dict(zip(names, paths))
