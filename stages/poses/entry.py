"""The stage entry point `run`: validate, plan (groups, input hashes, what is pending), pose the
pending captures (SfM a few at a time, rigs per session), write their records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stages.core import batching, contract, dataset, digests, io, worktree
from stages.core.contract import Context, require_data
from stages.core.errors import InputError
from stages.poses.capture import check_capture, complete_capture, sfm_capture
from stages.poses.options import EXPORTS, CapturePoses, Config, build_options
from stages.poses.rig import Rig, rig_path, solve_rig
from stages.poses.sfm import CheckedImages, cancellation_token
from stages.poses.write import write_capture

log = logging.getLogger("nvf")


def validate(cfg: Config) -> None:
    """Reject bad settings before any work (unknown exports, --colmap keys, rig mode)."""
    unknown = [e for e in cfg.export if e not in EXPORTS]
    if unknown:
        raise InputError(f"unknown export '{unknown[0]}'; choose from: {', '.join(EXPORTS)}")
    if cfg.focal_px is not None and not cfg.focal_px > 0:
        raise InputError(f"focal length must be positive, got {cfg.focal_px}")
    if cfg.captures_at_once < 1:
        raise InputError(f"--captures-at-once must be at least 1, got {cfg.captures_at_once}")
    build_options(cfg)  # raises for unknown --colmap keys


def resolve_rig(cfg: Config, layout: str) -> tuple[str, Rig | None]:
    """(mode, rig): mode off | auto | on | file; the rig loaded from ``cfg.rig`` when it names a file."""
    if cfg.rig == "off":
        return "off", None
    if cfg.rig in ("auto", "on"):
        if layout != "multipie":
            if cfg.rig == "auto":
                log.info("poses: --rig auto: layout '%s' is not a fixed camera rig; posing captures one by one", layout)
                return "off", None
            raise InputError(f"--rig on needs a fixed camera rig (the Multi-PIE layout, the same cameras in every "
                             f"capture); this dataset scanned as '{layout}'. Use --rig off or auto")  # fmt: skip
        return cfg.rig, None
    return "file", Rig.load(cfg.rig)


def capture_hash(capture: dataset.Capture, cfg: Config, image_digests: Sequence[str]) -> str:
    """Input hash of a capture: its image names and bytes (`image_digests`, sha256 in view order)
    plus the config (and the rig file's bytes)."""
    rig_file = [io.hash_file(cfg.rig)] if cfg.rig not in ("off", "auto", "on") and Path(cfg.rig).is_file() else []
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_HASHED}
    return io.hash_inputs(settings, capture.names, *rig_file, list(image_digests))


_NOT_HASHED = ("captures_at_once",)  # how the work is scheduled, not what it makes


def _groups(selected: Sequence[dataset.Capture], mode: str) -> list[list[dataset.Capture]]:
    """Units of work: one capture each, or (rig modes auto/on) the captures of a session together."""
    if mode not in ("auto", "on"):
        return [[capture] for capture in selected]
    by_session: dict[str, list[dataset.Capture]] = {}
    for capture in selected:
        by_session.setdefault(capture.session, []).append(capture)
    groups = []
    for session, members in by_session.items():
        if len(members) >= 2:
            groups.append(members)
        elif mode == "on":
            raise InputError(f"--rig on: session {session} has only capture {members[0].id} here; a rig is solved "
                             "from >= 2 captures of a session (add captures, reuse a rig file with --rig FILE, or "
                             "use --rig auto)")  # fmt: skip
        else:
            groups.append(members)
    return groups


Plan = tuple[list[dataset.Capture], list[str], list[bool]]
"""One unit of work (`_groups`): its captures, their input hashes, and which are to be posed."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Estimate poses for every selected capture of ``ctx.data`` into ``ctx.work``; returns the paths written.

    Every selected capture is validated (images readable, >= 2 views) before any is processed, so
    bad input writes nothing. Up-to-date captures (same input hash) are skipped unless ``ctx.overwrite``.
    Rig modes: ``auto``/``on`` pose the captures of a session together (a session with >= 2
    captures solves the rig from their SfM views, saves it as ``WORK/rig_<session>.safetensors``
    and poses every view SfM missed through it, source rig); a rig file poses each capture
    through that rig. So the unit of work is a rig group, not a capture, and poses walks its groups
    itself rather than through `contract.for_each_capture`. ``ctx.device`` is not used: pycolmap
    runs SIFT on the CPU (or on CUDA itself where its build has it). ``cfg.captures_at_once``
    captures go through SfM together, so one's single-threaded mapping overlaps another's extraction
    (4 ring captures on 2 cores: 4.41 s -> 3.74 s; the same poses).
    """
    validate(cfg)
    data, out = require_data(ctx, "poses"), Path(ctx.work)
    found = dataset.scan(data, cfg.layout)
    mode, rig = resolve_rig(cfg, found.layout)
    selected = contract.selected(ctx, "poses", found.captures)
    if not selected:
        return []
    groups = _groups(selected, mode)
    for capture in selected:
        check_capture(data, capture, decode=False)
    plans, checked = _plan(data, out, cfg, selected, groups, ctx.overwrite)
    return _pose_and_write(data, out, cfg, plans, checked, found.layout, rig, len(selected), ctx.progress)


def _plan(data: Path, out: Path, cfg: Config, selected: Sequence[dataset.Capture],
          groups: Sequence[list[dataset.Capture]], overwrite: bool) -> tuple[list[Plan], dict[str, CheckedImages]]:  # fmt: skip
    """Input hashes and pending flags per group, and the decoded images of what will be posed (all
    decoded before the first write; an up-to-date capture was decoded when it was posed)."""
    # Image digests are remembered in the work tree (core.digests): a rerun reads no unchanged file.
    memos: dict[str, digests.DigestMemo] = {}  # saved once the captures to pose are validated
    per_capture = dict(zip([c.id for c in selected], digests.image_digests(data, out, selected, memos=memos)))
    plans = [_plan_group(out, cfg, group, per_capture, overwrite) for group in groups]
    checked = {c.id: check_capture(data, c) for group, _, pending in plans for c, todo in zip(group, pending) if todo}
    for memo in memos.values():
        memo.save()
    return plans, checked


def _plan_group(out: Path, cfg: Config, group: list[dataset.Capture], per_capture: dict[str, list[str]],
                overwrite: bool) -> Plan:  # fmt: skip
    hashes = [capture_hash(c, cfg, per_capture[c.id]) for c in group]
    if len(group) > 1:  # a rig couples the captures of the group: each depends on all
        hashes = [io.hash_inputs(own, sorted(hashes)) for own in hashes]
    pending = [overwrite or not worktree.is_up_to_date(worktree.record_path(out, c.id, "poses"), h)
               or not _exports_present(out, c.id, cfg) for c, h in zip(group, hashes)]  # fmt: skip
    if len(group) > 1 and any(pending):
        pending = [True] * len(group)
    return group, hashes, pending


def _pose_and_write(data: Path, out: Path, cfg: Config, plans: Sequence[Plan], checked: dict[str, CheckedImages],
                    layout: str, rig: Rig | None, total: int,
                    progress: Callable[[int, int], None] | None) -> list[Path]:  # fmt: skip
    """SfM on the pending captures, `cfg.captures_at_once` at a time (a capture's mapping and adjustment
    run on one thread, its extraction and matching on all; results come back in order, bit for bit
    the same), then per group its rig, the fallbacks and the records."""
    written: list[Path] = []
    done = 0
    to_pose = [c for group, _, pending in plans for c, todo in zip(group, pending) if todo]

    cancel = cancellation_token() if to_pose else None

    def pose(capture: dataset.Capture) -> CapturePoses:
        return sfm_capture(data, capture, cfg, checked[capture.id], cancel=cancel)

    # BLAS on one thread for the whole run, set and restored here: sift_matching runs its own threads
    # on an error or Ctrl-C, the captures still in SfM are cancelled before they are waited for
    posed_in_order = batching.ordered_thread_map(pose, to_pose, cfg.captures_at_once,
                                                 on_abort=None if cancel is None else cancel.cancel)  # fmt: skip
    with batching.one_blas_thread(), contextlib.closing(posed_in_order) as posed:
        for group, hashes, pending in plans:
            partial = {c.id: next(posed) for c, todo in zip(group, pending) if todo}
            group_rig = rig
            if len(group) > 1 and partial:
                group_rig = _solve_group_rig(list(partial.values()), group)
                if group_rig is not None:
                    session = group[0].session
                    written.append(group_rig.save(rig_path(out, session), session, cfg, io.hash_inputs(sorted(hashes))))
            for capture, inputs_hash in zip(group, hashes):
                done += 1
                if capture.id not in partial:
                    log.info("poses: %s up to date, skipped", capture.id)
                else:
                    written.extend(_complete_and_write(out, data, cfg, capture, partial[capture.id], layout, group_rig,
                                                       inputs_hash))  # fmt: skip
                if progress is not None:
                    progress(done, total)
    return written


def _complete_and_write(out: Path, data: Path, cfg: Config, capture: dataset.Capture, partial: CapturePoses,
                        layout: str, rig: Rig | None, inputs_hash: str) -> list[Path]:  # fmt: skip
    """The fallbacks for the views SfM missed, then the capture's records; logs where poses came from."""
    poses = complete_capture(partial, capture, layout, rig)
    written = write_capture(out, data, capture, poses, cfg, inputs_hash)
    counts = {name: int((poses.source == code).sum()) for name, code in io.POSE_SOURCES.items()}
    log.info("poses: %s: %d/%d views by SfM, %d through the rig, %d interpolated", capture.id,
             counts["sfm"], len(poses.names), counts["rig"], counts["interp"])  # fmt: skip
    return written


def _solve_group_rig(partial: Sequence[CapturePoses], group: Sequence[dataset.Capture]) -> Rig | None:
    usable = [p for p in partial if int((p.source == io.POSE_SOURCES["sfm"]).sum()) >= 2]
    if len(usable) < 2:
        log.warning("poses: session %s: fewer than 2 captures with >= 2 SfM views; no rig solved",
                    group[0].session)  # fmt: skip
        return None
    rig = solve_rig(usable)
    log.info("poses: session %s: rig of %d cameras solved from %d captures (rotation spread median %.3f°)",
             group[0].session, len(rig.camera_ids), len(usable), float(np.median(rig.spread_deg)))  # fmt: skip
    return rig


def _exports_present(out: Path, capture: str, cfg: Config) -> bool:
    folder = worktree.capture_dir(out, capture)
    need = {"transforms": folder / "transforms.json", "colmap": folder / "colmap" / "images.txt"}
    return worktree.record_path(out, capture, "sparse").is_file() and all(need[e].exists() for e in cfg.export)


def load_poses(work: Path, capture: str) -> io.Record:
    """The poses record of a capture (validated)."""
    return io.load_record(worktree.record_path(work, capture, "poses"), kind="poses", capture=capture)
