"""File formats: raw runs, calibration constants, small-data output."""
