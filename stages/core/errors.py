"""The one error path of nvf.

Stages raise these; they never print or exit. The CLI (`nvfcli.app`) turns an `NvfError` into one
red line on stderr and the exit code the class carries: 2 for bad input the user can fix, 1 for a
failure while doing the work.
"""

from __future__ import annotations


class NvfError(Exception):
    """Base of every error nvf raises on purpose. The message says what is wrong and how to fix it."""

    exit_code = 1


class InputError(NvfError):
    """Bad input: a missing folder, a misnamed file, a record of the wrong kind. Exit code 2."""

    exit_code = 2


class RecordError(InputError):
    """A safetensors record that is missing, corrupt, of the wrong kind/capture, or mis-shaped."""


class ModelError(NvfError):
    """A model that cannot be found or loaded (offline without weights, a broken folder)."""


class StageFailure(NvfError):
    """The work itself failed (SfM found nothing, out of memory at batch size 1). Exit code 1."""
