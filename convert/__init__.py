"""Transforms between attention layouts, calibration, checkpoint I/O, model cards and the CLI."""
