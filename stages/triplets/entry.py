"""The stage entry point `run`: validate, find the records of the selected captures, skip an
up-to-date index, gather every capture's rows and write the index.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from stages.core import dataset, io, worktree
from stages.core.contract import Context
from stages.core.errors import InputError
from stages.triplets.config import Config, PairSpec
from stages.triplets.rows import _QUALITY_LEVEL, _capture_rows, _CaptureRows, _file_stamp, _records, _select
from stages.triplets.splits import check_fractions
from stages.triplets.write import _write

log = logging.getLogger("nvf")


def validate(cfg: Config) -> PairSpec:
    """Reject bad settings before any work; returns the parsed pair spec."""
    spec = PairSpec.parse(cfg.pairs)
    if cfg.min_depth_quality not in _QUALITY_LEVEL:
        raise InputError(f"unknown min depth quality '{cfg.min_depth_quality}': use failed, weak or good")
    if cfg.pose_code not in io.POSE_LAYOUTS:
        raise InputError(f"unknown --pose-code '{cfg.pose_code}': use paper, zero123 or both")
    if cfg.depth not in ("auto", "aligned", "depth", "none"):
        raise InputError(f"unknown --depth '{cfg.depth}': use auto, aligned, depth or none")
    if cfg.protocol is not None and cfg.protocol not in dataset.PROTOCOLS:
        raise InputError(f"unknown protocol '{cfg.protocol}'; choose one of: {', '.join(dataset.PROTOCOLS)}")
    check_fractions(cfg.train_split, cfg.val_split, cfg.test_split)
    return spec


def resolve_data_root(work: Path, data: Path | None) -> Path:
    """`data`, else the dataset root the work tree's embed records name (they must agree)."""
    if data is not None:
        return Path(data)
    roots = set()
    for path in sorted(Path(work).glob(f"*/{worktree.RECORD_FILES['embed']}")):
        root = io.read_record_metadata(path).get("data_root")
        if root:
            roots.add(root)
    if not roots:
        raise InputError(f"{work}: no embed records name their dataset; pass --data DATA (or run nvf embed first)")
    if len(roots) > 1:
        raise InputError(f"{work}: embed records come from {len(roots)} dataset folders ({', '.join(sorted(roots)[:2])}"
                         ", ...); pass --data DATA to say which holds the images")  # fmt: skip
    return Path(roots.pop())


PATHS = {"out": "triplets.safetensors"}
"""Named paths `Context.paths` may set: ``out``, the index file (default ``WORK/triplets.safetensors``)."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Build the triplet index of every capture of ``ctx.work``; returns the paths written.

    The index goes to ``ctx.paths["out"]`` (default ``WORK/triplets.safetensors``); the images are
    found under ``ctx.data``, else the dataset root the embed records name. A run on a subset of the
    captures (``ctx.partial``: a ``--captures`` list) indexes the captures that have records
    (`skip_missing`). Skips the work when the index was built from the same records and config
    (unless ``ctx.overwrite``). ``ctx.device`` is not used (all of this is numpy on the CPU).
    """
    if ctx.partial and not cfg.skip_missing:
        cfg = dataclasses.replace(cfg, skip_missing=True)
    out, data, overwrite, progress = ctx.path("out", PATHS["out"]), ctx.data, ctx.overwrite, ctx.progress
    spec = validate(cfg)
    work = Path(ctx.work)
    if not work.is_dir():
        raise InputError(f"{work}: no such work folder; run nvf poses / nvf embed DATA --out {work} first")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: the triplet index is a .safetensors file (e.g. {work}/triplets.safetensors)")
    data_root = resolve_data_root(work, data)
    index = dataset.scan(data_root, cfg.layout)
    selected = _select(index, cfg)
    if not selected:
        raise InputError(f"{data_root}: no captures pass the filters/protocol; loosen them (see `nvf scan --protocol`)")
    found = [(capture, sources, *_records(work, capture.id, cfg.depth)) for capture, sources in selected]
    lacking = [(capture.id, missing) for capture, _s, _r, missing in found if missing]
    if lacking and not cfg.skip_missing:
        cid, kinds = lacking[0]
        raise InputError(
            f"{len(lacking)} of {len(found)} capture(s) lack records in {work} (e.g. {cid}: no {' or '.join(kinds)}): "
            f"run nvf poses / nvf embed (and depth/align) for them, or pass --skip-missing"
        )
    if lacking:
        log.warning("triplets: %d capture(s) without records left out (e.g. %s)", len(lacking), lacking[0][0])
    found = [item for item in found if not item[3]]
    if not found:
        raise InputError(f"{work}: none of the selected captures has poses and embed records")
    stamps = [[capture.id, sorted(sources), [[k, *_file_stamp(p)] for k, p in sorted(recs.items())]]
              for capture, sources, recs, _m in found]  # fmt: skip
    inputs_hash = io.hash_inputs(dataclasses.asdict(cfg), str(Path(data_root).resolve()), index.layout, stamps)
    if not overwrite and worktree.is_up_to_date(out, inputs_hash):
        log.info("triplets: %s is up to date, skipped", out)
        return []
    rows: list[_CaptureRows] = []
    models_seen: dict[tuple[str, str, str], str] = {}
    if progress is not None:
        progress(0, len(found))
    for done, (capture, sources, recs, _missing) in enumerate(found):
        capture_rows, model = _capture_rows(capture, sources, recs, index.layout, cfg, spec)
        models_seen.setdefault((model["model"], model["pretrained"], model["embed_dim"]), capture.id)
        if capture_rows.views:
            rows.append(capture_rows)
        if progress is not None:
            progress(done + 1, len(found))
    if len(models_seen) > 1:
        (a, ca), (b, cb) = list(models_seen.items())[:2]
        raise InputError(f"embed records of different models cannot be mixed: {ca} has {a[0]}@{a[1] or '-'}, "
                         f"{cb} has {b[0]}@{b[1] or '-'}; rerun nvf embed with one model (--overwrite)")  # fmt: skip
    n_pairs = sum(len(r.sources) for r in rows)
    if n_pairs == 0:
        raise InputError(f"no (source, target) pairs: every selected capture has fewer than 2 usable views "
                         f"(pairs '{spec}', protocol {cfg.protocol or 'none'}); widen --cameras or drop "
                         "--exclude-interp")  # fmt: skip
    ((model_id, pretrained, embed_dim),) = list(models_seen)[:1]
    paths = _write(out, rows, cfg, spec, data_root, index.layout, inputs_hash,
                   {"embed_model": model_id, "embed_pretrained": pretrained, "embed_dim": embed_dim})  # fmt: skip
    log.info("triplets: %d image(s), %d pair(s) from %d capture(s) -> %s",
             sum(len(r.views) for r in rows), n_pairs, len(rows), out)  # fmt: skip
    return paths
