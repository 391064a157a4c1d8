"""Calibration: dark processing, constants, masks and the calibration pass."""
