"""Per-event feature functions (DESIGN §8). Each kind registers itself in FEATURES."""
from __future__ import annotations

from ..config import Where, check_keys

FEATURES: dict[str, type["Feature"]] = {}


def register(cls):
    FEATURES[cls.kind] = cls
    return cls


class Feature:
    """One configured function of one detector.

    Parameters are checked twice: their types when the config is read
    (``check_params``), their fit to the detector when the feature is built. ``process``
    takes a batch of calibrated frames (B, *shape) on the backend and returns
    ``{field: array (B, ...)}``; the output names are ``<name>_<field>``."""

    kind = ""
    name_prefix = ""
    PARAMS: tuple[str, ...] = ()

    @classmethod
    def default_name(cls, index: int) -> str:
        return f"{cls.name_prefix}_{index}"

    @classmethod
    def check_params(cls, params: dict, where: Where):
        check_keys(params, where, cls.PARAMS)

    def __init__(self, name, params, model, masks, backend, where: Where):
        self.name, self.params, self.model = name, params, model
        self.masks, self.backend, self.where = masks, backend, where

    def process(self, calib) -> dict:
        raise NotImplementedError

    def config_items(self) -> dict:
        """Parameters for /UserDataCfg/<det>/<name>__<param>."""
        return {}


from . import roi  # noqa: E402,F401  (registers the kinds)
