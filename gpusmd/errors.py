"""Errors that reach the user as one line naming the problem (file, key, event)."""


class GpusmdError(Exception):
    """Base class: the CLI prints these as ``gpusmd: error: <message>`` and exits 2."""


class ConfigError(GpusmdError):
    """A config file that cannot be used (unknown key, wrong type, bad value)."""


class RawFileError(GpusmdError):
    """A raw data file that does not match what it claims to hold."""


class FrameError(GpusmdError):
    """One event's data that does not match its detector (shape, dtype, truncation)."""


class ConstantsError(GpusmdError):
    """A missing or inconsistent calibration constants file."""
