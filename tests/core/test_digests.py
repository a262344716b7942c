"""core.digests: image digests remembered by (size, mtime, inode), so reruns read no unchanged file."""

from __future__ import annotations

import os

import pytest

from stages.core import digests, io
from stages.core.errors import InputError


@pytest.fixture
def counted_reads(monkeypatch):
    reads: list[str] = []
    original = io.hash_file

    def counting(path, *args, **kwargs):
        reads.append(os.path.basename(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(io, "hash_file", counting)
    return reads


def test_a_saved_memo_answers_without_reading_until_the_file_changes(tmp_path, counted_reads):
    image = tmp_path / "data" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"first version")
    memo = digests.DigestMemo(tmp_path / "work", "cap")
    first = memo.digest(image)
    assert first == io.hash_file(image) and counted_reads == ["a.png", "a.png"]
    memo.save()
    assert (tmp_path / "work" / digests.MEMO_DIR / "cap.json").is_file()
    assert not (tmp_path / "work" / "cap").exists()  # no capture folder for a cache
    counted_reads.clear()
    again = digests.DigestMemo(tmp_path / "work", "cap")  # a rerun: reloaded from disk
    assert again.digest(image) == first and counted_reads == [] and again.read == 0
    image.write_bytes(b"second version!")  # new size and mtime
    assert again.digest(image) == io.hash_file(image) != first and again.read == 1
    stat = image.stat()
    image.write_bytes(b"third  version!")  # same size ...
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # ... but a new mtime
    assert again.digest(image) == io.hash_file(image) and again.read == 2


def test_missing_files_and_unreadable_memos(tmp_path, counted_reads):
    with pytest.raises(InputError, match="gone.png: image not found"):
        digests.DigestMemo(tmp_path / "work", "cap").digest(tmp_path / "gone.png")
    memo_file = tmp_path / "work" / digests.MEMO_DIR / "cap.json"
    memo_file.parent.mkdir(parents=True)
    memo_file.write_text("{not json")
    image = tmp_path / "a.png"
    image.write_bytes(b"bytes")
    memo = digests.DigestMemo(tmp_path / "work", "cap")  # a broken memo is ignored, then rewritten
    assert memo.digest(image) == io.hash_file(image)
    memo.save()
    assert digests.DigestMemo(tmp_path / "work", "cap").digest(image) == io.hash_file(image)
    assert counted_reads.count("a.png") == 3  # the first digest and the two checks, never the memo's answer


def test_image_digests_per_capture_in_view_order(tmp_path):
    from stages.core import dataset

    for cap, names in (("c1", ["b.png", "a.png"]), ("c2", ["x.png"])):
        for name in names:
            (tmp_path / "data" / cap).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / cap / name).write_bytes(f"{cap}/{name}".encode())
    captures = [dataset.Capture("c1", "1", (dataset.ImageEntry("c1/b.png", "b"), dataset.ImageEntry("c1/a.png", "a"))),
                dataset.Capture("c2", "2", (dataset.ImageEntry("c2/x.png", "x"),))]  # fmt: skip
    found = digests.image_digests(tmp_path / "data", tmp_path / "work", captures, workers=2)
    expected = [
        [io.hash_file(tmp_path / "data" / p) for p in ("c1/b.png", "c1/a.png")],
        [io.hash_file(tmp_path / "data" / "c2/x.png")],
    ]
    assert found == expected
    assert sorted(p.name for p in (tmp_path / "work" / digests.MEMO_DIR).iterdir()) == ["c1.json", "c2.json"]
    memos: dict = {}  # the caller's memos: nothing is saved until it says so
    assert digests.image_digests(tmp_path / "data", tmp_path / "other", captures, memos=memos) == expected
    assert sorted(memos) == ["c1", "c2"] and not (tmp_path / "other").exists()
