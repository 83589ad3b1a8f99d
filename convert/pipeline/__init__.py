"""The conversion driver: the spec (every option once), preflight checks, calibration streams, the layer loop."""
