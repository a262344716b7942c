"""`nvf merge`: join the work trees of `nvf run --shard K/N` into one, checking nothing is missing.

Checks before anything moves (a refused merge changes nothing):

- every input holds a manifest from `nvf run` over the same dataset (capture-id hash), and the
  shards are all of one count N with each index 0..N-1 exactly once;
- every capture of the dataset belongs to exactly one shard, and its folder holds the outputs of
  every per-capture stage that shard completed; captures missing from every shard are named;
- a file present in two places (two shards, or a shard and OUT already) must have the same bytes:
  conflicts are refused (e.g. rig files solved per shard), identical copies are kept once.

Then capture folders are placed in OUT by `mode`: ``hardlink`` (default; falls back to copy across
file systems), ``copy`` or ``move`` (renames: fastest, empties the shards). Each folder lands by an
atomic rename, so an interrupted merge can be rerun. The merged ``OUT/manifest.json`` sums bytes,
files and capture counts over the shards and keeps each shard's summary under ``merged_from``;
`nvf run DATA OUT` on the merged tree then finds the per-capture work up to date and runs the
global stages (triplets, train, ...).
"""

from __future__ import annotations

import errno
import filecmp
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages import pipeline
from stages.core import dataset, digests, io, worktree
from stages.core.errors import InputError

log = logging.getLogger("nvf")

Mode = Literal["hardlink", "copy", "move"]
MODES: tuple[str, ...] = ("hardlink", "copy", "move")
_DONE = ("done", "up-to-date")


@dataclass
class Plan:
    """What a merge will do: capture folders and other files to place, and what is already there."""

    captures: dict[str, Path] = field(default_factory=dict)  # capture id -> its folder in a shard
    files: dict[Path, Path] = field(default_factory=dict)  # relative path -> source, for non-capture files
    present: set[Path] = field(default_factory=set)  # relative paths (capture folders or files) already in OUT


def run(shards: Sequence[Path], out: Path, *, mode: Mode = "hardlink", data: Path | None = None) -> dict[str, Any]:
    """Merge the shard work trees ``shards`` into ``out``; returns the merged manifest (also written)."""
    if mode not in MODES:
        raise InputError(f"unknown --mode '{mode}': use {', '.join(MODES)}")
    shards = [Path(s).resolve() for s in shards]
    out = Path(out).resolve()
    if not shards:
        raise InputError("give at least one shard folder (the OUT of `nvf run --shard K/N`)")
    if len(set(shards)) < len(shards):
        raise InputError("a shard folder is given twice")
    if out in shards:
        raise InputError(f"--out {out} is one of the shards; merge into a new folder")
    manifests = [_manifest(shard) for shard in shards]
    _check_shards(shards, manifests)
    _check_coverage(shards, manifests, data)
    plan = _plan(shards, manifests, out)
    _place(plan, out, mode)
    merged = merged_manifest(shards, manifests, out)
    io.write_json(out / pipeline.MANIFEST, merged)
    log.info("merge: %d capture(s) from %d shard(s) into %s (%s)", len(plan.captures), len(shards), out, mode)
    return merged


def _manifest(shard: Path) -> dict[str, Any]:
    if not shard.is_dir():
        raise InputError(f"{shard}: no such folder")
    doc = pipeline.read_manifest(shard)
    if not doc.get("stages") or "captures" not in doc:
        raise InputError(
            f"{shard}: no readable {pipeline.MANIFEST}; nvf merge joins the outputs of `nvf run --shard K/N`"
        )
    if doc.get("status") == "running":
        log.warning("merge: %s: its run did not finish (status running); its completed stages are checked", shard)
    return doc


def _check_shards(shards: list[Path], manifests: list[dict[str, Any]]) -> None:
    """Same dataset, one shard count, each index once."""
    first = manifests[0]["dataset"]
    for shard, doc in zip(shards, manifests):
        if doc["dataset"].get("ids_hash") != first.get("ids_hash"):
            raise InputError(f"{shard} covers another dataset than {shards[0]} ({doc['dataset'].get('captures')} vs "
                             f"{first.get('captures')} captures, or other ids): merge shards of one run only")  # fmt: skip
    counts = {doc["shard"]["count"] for doc in manifests}
    if len(counts) > 1:
        raise InputError(f"the shards were cut differently (--shard K/N with N = {sorted(counts)}); rerun with one N")
    (count,) = counts
    seen: dict[int, Path] = {}
    for shard, doc in zip(shards, manifests):
        index = doc["shard"]["index"]
        if index in seen and count > 1:
            raise InputError(f"shard {index}/{count} given twice: {seen[index]} and {shard}")
        seen[index] = shard
    missing = [k for k in range(count) if k not in seen]
    if missing and count > 1:
        raise InputError(f"shard(s) {', '.join(f'{k}/{count}' for k in missing)} missing from the merge "
                         f"(got {len(seen)} of {count}); run them or pass their folders")  # fmt: skip


def _check_coverage(shards: list[Path], manifests: list[dict[str, Any]], data: Path | None) -> None:
    """Every capture in exactly one shard, and the union is the dataset (missing ones named)."""
    owner: dict[str, Path] = {}
    for shard, doc in zip(shards, manifests):
        for capture in doc["captures"]:
            if capture in owner:
                raise InputError(f"capture {capture} is in two shards ({owner[capture]} and {shard}); shards must not "
                                 "overlap: cut them with --shard K/N of one N")  # fmt: skip
            owner[capture] = shard
    expected = manifests[0]["dataset"]
    if pipeline.capture_ids_hash(list(owner)) == expected.get("ids_hash"):
        return
    root = Path(data) if data is not None else Path(manifests[0].get("data", ""))
    missing_text = f"{expected.get('captures', '?')} expected, {len(owner)} found"
    try:
        scan_cfg = manifests[0].get("config", {}).get("stages", {}).get("scan", {})
        filters = dataset.Filters(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in scan_cfg.get("filters", {}).items()})  # fmt: skip
        every = [c.id for c in dataset.scan(root, scan_cfg.get("layout", "auto"), filters).captures]
        missing = [c for c in every if c not in owner]
        if missing:
            missing_text = f"{len(missing)} missing, e.g. {', '.join(missing[:3])}"
    except Exception as exc:  # the dataset is not reachable from here: counts only
        log.debug("merge: cannot rescan %s to name the missing captures: %s", root, exc)
    raise InputError(f"the shards do not cover the dataset ({missing_text}): run the missing shards, or the "
                     "missing captures with --captures, then merge again")  # fmt: skip


def _plan(shards: list[Path], manifests: list[dict[str, Any]], out: Path) -> Plan:
    """Find every file to place; refuse missing outputs and conflicting contents before touching anything."""
    plan = Plan()
    missing: list[str] = []
    for shard, doc in zip(shards, manifests):
        names = [name for step in pipeline.STEPS if step.scope == "capture" and step.outputs
                 and doc["stages"].get(step.name, {}).get("status") in _DONE for name in step.outputs]  # fmt: skip
        captures = set(doc["captures"])
        for capture in doc["captures"]:
            folder = worktree.capture_dir(shard, capture)
            absent = [name for name in names if not (folder / name).is_file()]
            if absent:
                missing.append(f"{folder}/{absent[0]}")
            plan.captures[capture] = folder
        for path in _other_files(shard, captures):
            rel = path.relative_to(shard)
            if rel in plan.files and not _same(plan.files[rel], path):
                raise InputError(_conflict(rel, plan.files[rel], path))
            plan.files.setdefault(rel, path)
    if missing:
        raise InputError(f"{len(missing)} output(s) of completed stages missing from the shards, e.g. {missing[0]}: "
                         "rerun that shard (nvf run picks up where it stopped), then merge")  # fmt: skip
    for capture, folder in plan.captures.items():
        target = worktree.capture_dir(out, capture)
        if target.exists():
            for path in _files(folder):
                existing = target / path.relative_to(folder)
                if existing.exists() and not _same(existing, path):
                    raise InputError(_conflict(existing.relative_to(out), existing, path))
            plan.present.add(Path(capture))
    for rel, source in plan.files.items():
        if (out / rel).exists():
            if not _same(out / rel, source):
                raise InputError(_conflict(rel, out / rel, source))
            plan.present.add(rel)
    return plan


def _conflict(rel: Path, a: Path, b: Path) -> str:
    hint = ""
    if rel.name.startswith("rig_"):
        hint = (" (each shard solved its own rig from its own captures: solve the rig once with `nvf poses --rig on` "
                "and pass --rig FILE to every shard, or use --rig off)")  # fmt: skip
    return f"{rel}: {a} and {b} differ{hint}; refusing to merge (remove the wrong one and rerun nvf merge)"


def _other_files(shard: Path, captures: set[str]) -> list[Path]:
    """The shard's files outside its capture folders (index.json, rig files, ...), manifest and temps aside."""
    found = []
    for path in sorted(shard.iterdir()):
        if (path.name in (pipeline.MANIFEST, digests.MEMO_DIR) or worktree.TEMP_NAME.match(path.name)
                or path.name in captures):  # fmt: skip
            continue
        found.extend(_files(path) if path.is_dir() else [path])
    return found


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not worktree.TEMP_NAME.match(p.name))


def _same(a: Path, b: Path) -> bool:
    """Same bytes; for safetensors records, same tensors and metadata (the header's metadata order
    differs between two saves of the same record)."""
    if a.is_dir() or b.is_dir():
        return False
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix != ".safetensors" or b.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(a), "numpy") as fa, safe_open(str(b), "numpy") as fb:
            names = sorted(fa.keys())
            if fa.metadata() != fb.metadata() or names != sorted(fb.keys()):
                return False
            for name in names:
                ta, tb = fa.get_tensor(name), fb.get_tensor(name)
                if ta.dtype != tb.dtype or ta.shape != tb.shape or ta.tobytes() != tb.tobytes():
                    return False
            return True
    except Exception:  # not readable as safetensors: the bytes differ, so they differ
        return False


def _place(plan: Plan, out: Path, mode: Mode) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for capture, folder in plan.captures.items():
        target = worktree.capture_dir(out, capture)
        if Path(capture) not in plan.present:
            _place_dir(folder, target, mode)
            continue
        for path in _files(folder):  # a folder merged before (an interrupted or repeated merge)
            dest = target / path.relative_to(folder)
            if not dest.exists():
                _place_file(path, dest, mode)
    for rel, source in plan.files.items():
        if rel not in plan.present:
            _place_file(source, out / rel, mode)


def _place_dir(source: Path, target: Path, mode: Mode) -> None:
    if mode == "move":
        try:
            os.rename(source, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            mode = "copy"  # another file system: copy below, then drop the source
    with io.atomic_dir(target, mark=False) as tmp:  # a capture folder as the shard holds it, no more
        tmp.rmdir()
        shutil.copytree(source, tmp, copy_function=_copier(mode, source, target))
    if mode == "move":
        shutil.rmtree(source)


def _place_file(source: Path, target: Path, mode: Mode) -> None:
    with io.atomic_path(target) as tmp:
        tmp.unlink()
        _copier(mode, source, target)(str(source), str(tmp))
    if mode == "move":
        source.unlink()


def _copier(mode: Mode, source: Path, target: Path):
    if mode != "hardlink":
        return shutil.copy2

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            log.debug("merge: cannot hard-link %s (%s); copying", src, exc.strerror)
            shutil.copy2(src, dst)

    return link


def merged_manifest(shards: list[Path], manifests: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """One manifest for the merged tree: per stage the combined status and the sums over shards."""
    first = manifests[0]
    hashes = {doc["versions"]["hash"] for doc in manifests}
    captures = [c for doc in sorted(manifests, key=lambda d: d["shard"]["index"]) for c in doc["captures"]]
    stages: dict[str, Any] = {}
    for item in pipeline.STEPS:
        entries = [doc["stages"].get(item.name, {}) for doc in manifests]
        statuses = [e.get("status", "not-run") for e in entries]
        entry: dict[str, Any] = {"status": _combined(statuses), "shards": statuses}
        for key in ("files_written", "bytes_written", "bytes_total", "captures", "captures_written"):
            values = [e.get(key) for e in entries if isinstance(e.get(key), int)]
            if values:
                entry[key] = sum(values)
        seconds = [e["seconds"] for e in entries if isinstance(e.get("seconds"), (int, float))]
        if seconds:
            entry.update(seconds=round(sum(seconds), 3), seconds_max_shard=round(max(seconds), 3))
        stage_hashes = {e.get("versions_hash") for e in entries if e.get("versions_hash")}
        if stage_hashes:  # shards made with other versions: the next nvf run redoes that stage
            entry["versions_hash"] = stage_hashes.pop() if len(stage_hashes) == 1 else "mixed"
        if entries and entries[0].get("config") is not None:
            entry["config"] = entries[0]["config"]
        for key in ("error", "reason"):
            found = next((e[key] for e in entries if e.get(key)), None)
            if found:
                entry[key] = found
        stages[item.name] = entry
    if len(hashes) > 1:
        log.warning("merge: the shards ran with different nvf/library versions; nvf run on the result redoes them")
    return {
        "nvf_version": first["nvf_version"],
        "versions": first["versions"]
        if len(hashes) == 1
        else {"hash": "mixed", "shards": [d["versions"] for d in manifests]},
        "data": first["data"],
        "out": str(out),
        "dataset": first["dataset"],
        "shard": {"index": 0, "count": 1},
        "captures": captures,
        "config": first["config"],
        "status": "merged",
        "merged_from": [
            {
                "path": str(shard),
                "shard": doc["shard"],
                "captures": len(doc["captures"]),
                "status": doc.get("status"),
                "started": doc.get("started"),
                "finished": doc.get("finished"),
                "seconds": doc.get("seconds"),
            }
            for shard, doc in zip(shards, manifests)
        ],  # fmt: skip
        "stages": stages,
    }


def _combined(statuses: list[str]) -> str:
    for status in ("failed", "running", "unavailable", "not-run"):
        if status in statuses:
            return status
    if "done" in statuses:
        return "done"
    return statuses[0] if statuses else "not-run"
