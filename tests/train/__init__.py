"""Tests of stages/train/ (one file per module), sharing the fixture builders in `tests.train.fixtures`."""
