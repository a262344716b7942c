"""Shared core of the stages: formats, layouts, geometry, batching, models. Imports no stage."""
