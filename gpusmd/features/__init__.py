"""Per-event feature functions (DESIGN §8). Each kind registers itself in FEATURES."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Where, check_keys

FEATURES: dict[str, type["Feature"]] = {}


def register(cls):
    FEATURES[cls.kind] = cls
    return cls


@dataclass
class Ragged:
    """Variable-length per-event records (droplets, photons, sparse pixels): each field
    holds the records of all events of a batch one after the other, ``lengths`` (B,) how
    many belong to each event. Written as /<det>/var_<name>/<field> and
    /<det>/var_<name>_len (DESIGN §9)."""
    lengths: np.ndarray
    fields: dict

    def __post_init__(self):
        total = int(np.asarray(self.lengths).sum())
        for key, value in self.fields.items():
            if len(value) != total:
                raise ValueError(f"ragged field {key!r} has {len(value)} records, lengths say {total}")


class Feature:
    """One configured function of one detector.

    Parameters are checked twice: their types when the config is read
    (``check_params``), their fit to the detector when the feature is built. ``process``
    takes a batch of calibrated frames (B, *input_shape) on the backend and returns
    ``{field: array (B, ...)}`` (a :class:`Ragged` value for variable-length records);
    the output names are ``<name>_<field>``. ``input_shape`` is the detector's raw shape,
    or for a chained function its parent's output shape."""

    kind = ""
    name_prefix = ""
    PARAMS: tuple[str, ...] = ()

    @classmethod
    def default_name(cls, index: int) -> str:
        return f"{cls.name_prefix}_{index}"

    @classmethod
    def check_params(cls, params: dict, where: Where):
        check_keys(params, where, cls.PARAMS)

    def __init__(self, name, params, model, masks, backend, where: Where, input_shape=None):
        self.name, self.params, self.model = name, params, model
        self.masks, self.backend, self.where = masks, backend, where
        self.input_shape = tuple(input_shape or model.shape)

    def process(self, calib) -> dict:
        raise NotImplementedError

    def config_items(self) -> dict:
        """Parameters for /UserDataCfg/<det>/<name>__<param>."""
        return {}


from . import roi  # noqa: E402,F401  (registers the kinds)
