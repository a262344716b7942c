"""Person-disjoint splits: fractions, counts, the seeded deal of subjects, and the leakage check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stages.core.errors import InputError, RecordError
from stages.triplets.config import SPLITS


def check_fractions(train: float, val: float | None, test: float) -> tuple[float, float, float]:
    """(train, val, test) fractions, val defaulting to the rest; InputError for a fraction outside
    [0, 1], a sum above 1, or no training fraction."""
    val = 1.0 - train - test if val is None else val
    fractions = {"--train-split": train, "--val-split": val, "--test-split": test}
    for name, value in fractions.items():
        if not -1e-9 <= value <= 1 + 1e-9:
            raise InputError(f"{name} must be a fraction in [0, 1], got {value:g} (train + test must not exceed 1)")
    if train + val + test > 1 + 1e-6:
        raise InputError(f"split fractions add up to {train + val + test:g} > 1: lower --train-split or --val-split")
    if train <= 0:
        raise InputError("--train-split must be positive: training needs at least one person")
    return train, max(val, 0.0), test


def split_counts(n_subjects: int, train: float, val: float | None, test: float) -> tuple[int, int, int]:
    """(train, val, test) subject counts by rounding; a split with a positive fraction gets at least
    one subject while train keeps one. InputError when no subject is left for training."""
    train, val, test = check_fractions(train, val, test)
    n_test = round(test * n_subjects)
    n_val = round(val * n_subjects)
    if test > 1e-9 and n_test == 0 and n_subjects - n_val >= 2:
        n_test = 1
    if val > 1e-9 and n_val == 0 and n_subjects - n_test >= 2:
        n_val = 1
    n_train = n_subjects - n_val - n_test
    if n_train < 1:
        raise InputError(
            f"{n_subjects} person(s) leave none for training with these split fractions: raise --train-split"
        )
    return n_train, n_val, n_test


def assign_splits(
    subjects: Sequence[str], train: float = 0.9, val: float | None = None, test: float = 0.0, seed: int = 0
) -> dict[str, str]:
    """subject -> split name, disjoint by construction: sorted subjects shuffled with `seed`, dealt
    train first, then val, then test. The same subjects, fractions and seed give the same result."""
    unique = sorted(set(subjects))
    n_train, n_val, _n_test = split_counts(len(unique), train, val, test)
    shuffled = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    return {
        subject: "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for i, subject in enumerate(shuffled)
    }


def check_splits(subject_index: np.ndarray, split: np.ndarray, subjects: Sequence[str], where: Path | str) -> None:
    """RecordError when a person has images in two splits (identity leakage)."""
    subject_index = np.asarray(subject_index)
    split = np.asarray(split)
    names = {v: k for k, v in SPLITS.items()}
    for s in np.unique(subject_index):
        found = np.unique(split[subject_index == s])
        if len(found) > 1:
            found_names = " and ".join(names.get(int(v), str(int(v))) for v in found)
            raise RecordError(
                f"{where}: person {subjects[int(s)]} is in the {found_names} splits (identity leakage); "
                "rebuild it with `nvf triplets`"
            )
