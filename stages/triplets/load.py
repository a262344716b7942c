"""Loading a triplet index: `TripletSet` (the checked record, with pair and embedding helpers) and
`load_triplets`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.core import io
from stages.core.errors import InputError, RecordError
from stages.triplets.config import KIND, SPLITS, STAGE, record_schema
from stages.triplets.splits import check_splits


@dataclass(frozen=True)
class TripletSet:
    """A loaded triplet index (checked: schema, person-disjoint splits, references in range).

    `record[...]` gives the tensors (see `SCHEMA`); paths are resolved against the file's folder.
    """

    record: io.Record
    captures: list[dict[str, str]]
    subjects: list[str]
    splits: dict[str, list[str]]
    data_root: Path
    conditioning: str

    @property
    def path(self) -> Path:
        return self.record.path

    def __getitem__(self, key: str) -> np.ndarray:
        return self.record[key]

    @property
    def n_images(self) -> int:
        return len(self.record.names)

    @property
    def n_pairs(self) -> int:
        return len(self.record["pair_source"])

    def image_path(self, row: int) -> Path:
        """The image file of image row `row`."""
        return self.data_root / self.record.names[row]

    def record_path(self, capture_index: int, kind: Literal["poses", "embed", "depth"]) -> Path | None:
        """A capture's record of `kind` (None when D_I has no depth for it)."""
        rel = self.captures[capture_index].get(kind, "")
        return (self.path.parent / rel) if rel else None

    def pairs(self, split: str) -> np.ndarray:
        """Pair indices [k] whose images belong to `split` (train, val or test)."""
        if split not in SPLITS:
            raise InputError(f"unknown split '{split}': use {', '.join(SPLITS)}")
        return np.flatnonzero(self.record["split"][self.record["pair_source"]] == SPLITS[split])

    def embeddings(self, raw: bool = False) -> np.ndarray:
        """z_I [N, D] float32 of every image row, read from the captures' embed records.

        Unit rows (the paper's z_I), or with `raw` the model's output before normalising (unit row
        times the record's ``norm``), which Zero123's camera projection was trained on.
        """
        capture_index, embed_row = self.record["capture_index"], self.record["embed_row"]
        out: np.ndarray | None = None
        for c in range(len(self.captures)):
            members = np.flatnonzero(capture_index == c)
            if not len(members):
                continue
            path = self.record_path(c, "embed")
            record = io.load_record(path, kind="embed", capture=self.captures[c]["id"])  # type: ignore[arg-type]
            matrix = record["embedding"]
            if raw:
                if "norm" not in record.tensors:
                    raise InputError(f"{path} has unit embeddings only (written by an older nvf embed); raw "
                                     "CLIP features need their norms: rerun nvf embed with --overwrite")  # fmt: skip
                matrix = matrix * record["norm"][:, None]
            if out is None:
                out = np.zeros((self.n_images, matrix.shape[1]), dtype=np.float32)
            out[members] = matrix[embed_row[members]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def pose_conditioning(self, pairs: np.ndarray | None = None) -> np.ndarray:
        """The pose part of z_cond [P, 12 | 4 | 16] for `conditioning` paper | zero123 | both, in the
        order of `io.POSE_LAYOUTS` (both: [4 ‖ 12])."""
        select = slice(None) if pairs is None else np.asarray(pairs)
        names = io.POSE_LAYOUTS[self.conditioning]
        return io.pose_part({name: self.record[name][select] for name in names}, self.conditioning)

    def z_cond(self, pairs: np.ndarray | None = None, embeddings: np.ndarray | None = None) -> np.ndarray:
        """z_cond = [CLIP(source) ‖ pose code] [P, D + k] float32 (524 for ViT-B/32 and the paper's code)."""
        embeddings = self.embeddings() if embeddings is None else embeddings
        select = slice(None) if pairs is None else np.asarray(pairs)
        source = self.record["pair_source"][select]
        return io.join_z_cond(embeddings[source], self.pose_conditioning(pairs))


def load_triplets(path: str | os.PathLike) -> TripletSet:
    """Load and check a triplet index: schema, references in range, and no person in two splits."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: triplet index not found; build it with `nvf triplets WORK`")
    meta = io.read_record_metadata(path)
    optional = json.loads(meta.get("optional_tensors", "[]"))
    record = io.load_record(path, kind=KIND, stage=STAGE, schema=record_schema(optional))
    try:
        captures = json.loads(record.extra["captures"])
        subjects = json.loads(record.extra["subjects"])
        splits = json.loads(record.extra["splits"])
        data_root = path.parent / record.extra["data_root"]
        conditioning = record.extra["conditioning"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: triplet metadata incomplete ({exc}); rebuild it with `nvf triplets`") from None
    n, c, s = len(record.names), len(captures), len(subjects)
    for key, bound in (("capture_index", c), ("subject_index", s), ("pair_source", n), ("pair_target", n)):
        values = record[key]
        if len(values) and (values.min() < 0 or values.max() >= bound):
            raise RecordError(
                f"{path}: '{key}' points outside its table (size {bound}); rebuild it with `nvf triplets`"
            )
    if len(record["pose_scale"]) != c:
        raise RecordError(f"{path}: {len(record['pose_scale'])} pose scales for {c} captures; rebuild it")
    check_splits(record["subject_index"], record["split"], subjects, path)
    listed = [person for name in SPLITS for person in splits.get(name, [])]
    if len(listed) != len(set(listed)):
        twice = next(p for p in listed if listed.count(p) > 1)
        raise RecordError(f"{path}: person {twice} is listed in two splits (identity leakage); rebuild it")
    for name, code in SPLITS.items():
        members = {subjects[i] for i in np.unique(record["subject_index"][record["split"] == code])}
        if not members <= set(splits.get(name, [])):
            raise RecordError(f"{path}: the '{name}' split holds persons not listed for it; rebuild it")
    if conditioning != "paper" and "zero123_code" not in record.tensors:
        raise RecordError(f"{path}: conditioning '{conditioning}' needs 'zero123_code', which is missing; rebuild it")
    return TripletSet(record, captures, subjects, splits, data_root, conditioning)
