"""Content digests of input images, remembered per capture of a work tree so reruns read no pixels.

A stage knows it is up to date by hashing its inputs (sha256 of each image's bytes). At Multi-PIE
scale (750k images, ~305 GB) a no-op rerun of poses, depth and embed would read the dataset three
times. `DigestMemo` keeps ``WORK/.nvf-digests/<capture>.json``: for each file (absolute path) its
size, modification time (ns), inode and sha256 (outside the capture folders, so a failed stage
leaves no capture folder behind). A file whose size, mtime and inode are unchanged is not read
again; any change to them rehashes it.

Like make and rsync this trusts that rewriting a file changes its mtime (or size); to force a
rehash, ``touch`` the file or delete the memo. Shards own disjoint captures, so two processes never
write the same memo; stages running at once on one capture each replace it atomically with their
own entries, which at worst costs a later rehash. The memo never decides anything by itself: it
only stands in for reading the bytes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.core import dataset, io
from stages.core.errors import InputError

log = logging.getLogger("nvf")

MEMO_DIR = ".nvf-digests"  # under the work tree; `nvf merge` leaves it out (a cache, not an output)
_VERSION = 1


class DigestMemo:
    """sha256 hex digests of a capture's files, remembered in ``WORK/.nvf-digests/<capture>.json`` by
    (size, mtime_ns, inode)."""

    def __init__(self, work: str | os.PathLike, capture: str) -> None:
        self.path = Path(work) / MEMO_DIR / f"{capture}.json"
        self.entries: dict[str, list] = {}  # absolute path -> [size, mtime_ns, inode, sha256]
        self.read = 0  # files hashed by reading their bytes, this session
        self._dirty = False
        self._lock = threading.Lock()
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("version") == _VERSION and isinstance(stored.get("files"), dict):
                self.entries = stored["files"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as err:  # unreadable memo: rehash, rewrite on save
            log.debug("digests: ignoring %s (%s)", self.path, err)

    def digest(self, path: str | os.PathLike) -> str:
        """sha256 hex digest of the file's bytes (read only when the file changed since it was recorded)."""
        key = os.path.abspath(path)
        try:
            stat = os.stat(key)
        except FileNotFoundError:
            raise InputError(f"{path}: image not found (did the dataset change since the scan?)") from None
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.entries.get(key)
        if entry is not None and entry[:3] == signature:
            return entry[3]
        digest = io.hash_file(key)
        with self._lock:
            self.entries[key] = [*signature, digest]
            self.read += 1
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the memo (atomically) when a digest was added or changed; creates the folder."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            io.write_text(self.path, json.dumps({"version": _VERSION, "files": self.entries}, indent=0) + "\n")
            self._dirty = False


def image_digests(data: Path, out: Path, captures: Sequence[dataset.Capture], workers: int = 4,
                  memos: dict[str, DigestMemo] | None = None) -> list[list[str]]:  # fmt: skip
    """sha256 of every image of `captures` under `data`: one list per capture, in view order, through
    each capture's memo in the work tree `out`; `workers` threads read files. The memos are saved
    here, unless the caller passes a dict `memos` to receive them and save them itself (after it
    validated its inputs, say)."""
    own = memos is None
    memos = {} if memos is None else memos
    memos.update({capture.id: DigestMemo(out, capture.id) for capture in captures})
    jobs = [(memos[capture.id], Path(data) / image.path) for capture in captures for image in capture.images]
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="nvf-hash") as pool:
        flat = iter(list(pool.map(lambda job: job[0].digest(job[1]), jobs)))
    if own:
        for memo in memos.values():
            memo.save()
    return [[next(flat) for _ in capture.images] for capture in captures]
