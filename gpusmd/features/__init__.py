"""Per-event feature functions (DESIGN §8). Each kind registers itself in FEATURES."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Where, check_keys

FEATURES: dict[str, type["Feature"]] = {}
# smalldata_tools' names of the functions (its classes), so that its settings carry over
KIND_ALIASES = {
    "ROIFunc": "roi", "projectionFunc": "projection", "spectrumFunc": "spectrum",
    "sparsifyFunc": "sparsify", "dropletFunc": "droplet", "droplet2Photons": "droplet2photons",
    "photonFunc": "photons", "azimuthalBinning": "azav", "Autocorrelation": "autocorr",
    "autocorrelation": "autocorr", "imageFunc": "image", "lineoutFunc": "lineout",
}


def register(cls):
    FEATURES[cls.kind] = cls
    return cls


def canonical_kind(name):
    """The kind a config's ``kind`` names: its own name or smalldata_tools' (ROIFunc)."""
    return KIND_ALIASES.get(name, name) if isinstance(name, str) else name


@dataclass
class Ragged:
    """Variable-length per-event records (droplets, photons, sparse pixels): each field
    holds the records of all events of a batch one after the other, ``lengths`` (B,) how
    many belong to each event. Written as /<det>/var_<name>/<field> and
    /<det>/var_<name>_len (DESIGN §9)."""
    lengths: np.ndarray
    fields: dict

    def __post_init__(self):
        total = int(self.lengths.sum())
        for key, value in self.fields.items():
            if len(value) != total:
                raise ValueError(f"ragged field {key!r} has {len(value)} records, lengths say {total}")

    def __len__(self) -> int:       # events, like a per-event column
        return len(self.lengths)

    def to_host(self, backend) -> "Ragged":
        return Ragged(np.asarray(backend.to_host(self.lengths), np.int64),
                      {k: backend.to_host(v) for k, v in self.fields.items()})

    @staticmethod
    def concat(parts: list["Ragged"]) -> "Ragged":
        return Ragged(np.concatenate([p.lengths for p in parts]),
                      {k: np.concatenate([p.fields[k] for p in parts]) for k in parts[0].fields})


def check_ndata(params: dict, where: Where):
    """nData: null (variable-length records) or the fixed number of records per event."""
    nd = params.get("nData")
    if nd is not None:
        if isinstance(nd, bool) or not isinstance(nd, int):
            raise (where / "nData").error(f"expected a positive integer or null, got {nd!r}")
        if nd < 1:
            raise (where / "nData").error(f"must be >= 1, got {nd}")


RAGGED_SEP = "#"     # "<column>#len", "<column>#<field>": a Ragged column as plain arrays


def flatten_columns(columns: dict) -> dict:
    """Columns as plain arrays (for the wire): Ragged ones split by RAGGED_SEP."""
    out = {}
    for key, value in columns.items():
        if isinstance(value, Ragged):
            out[f"{key}{RAGGED_SEP}len"] = value.lengths
            out.update({f"{key}{RAGGED_SEP}{f}": v for f, v in value.fields.items()})
        else:
            out[key] = value
    return out


def unflatten_columns(arrays: dict) -> dict:
    """The inverse of flatten_columns."""
    out, ragged = {}, {}
    for key, value in arrays.items():
        if RAGGED_SEP in key:
            column, field = key.split(RAGGED_SEP, 1)
            ragged.setdefault(column, {})[field] = value
        else:
            out[key] = value
    for column, parts in ragged.items():
        lengths = parts.pop("len")
        out[column] = Ragged(np.asarray(lengths, np.int64), parts)
    return out


def concat_columns(values: list):
    """Batches of one column, joined: arrays or Ragged records."""
    if isinstance(values[0], Ragged):
        return Ragged.concat(values)
    return np.concatenate(values)


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
    accepts_rms = False         # True: built with rms= the pixel noise, frames' units
    PARAMS: tuple[str, ...] = ()
    PARAM_ALIASES: dict[str, str] = {}  # smalldata_tools' name of a parameter -> ours

    numbered = False    # True: ROI_0, ROI_1, ...; False: spectrum, spectrum_1, ...

    @classmethod
    def name_base(cls, params: dict) -> str:
        """The name without its number (some kinds name themselves by a parameter)."""
        return cls.name_prefix

    @classmethod
    def default_name(cls, index: int, params: dict | None = None) -> str:
        base = cls.name_base(params or {})
        return f"{base}_{index}" if cls.numbered or index else base

    @classmethod
    def default_name_for(cls, params: dict, index: int) -> str:
        """The name when the config gives none: the index-th function of this kind."""
        return cls.default_name(index, params)

    # what a chained function receives: set by process() when the kind can feed children
    output_shape: tuple | None = None
    child_data = None

    @classmethod
    def takes(cls, parent: "Feature") -> bool:
        """Whether this kind can take ``parent``'s output: arrays, by default (a droplet
        hands on droplets, which only droplet2photons takes)."""
        return type(parent.output_shape) is tuple

    @classmethod
    def canonical_params(cls, params: dict, where: Where) -> dict:
        """``params`` with smalldata_tools' names of parameters replaced by ours."""
        out = {}
        for key, value in params.items():
            own = cls.PARAM_ALIASES.get(key, key)
            if own in out:
                raise (where / key).error(f"given twice, as {own!r} and as {key!r}")
            out[own] = value
        return out

    @classmethod
    def check_params(cls, params: dict, where: Where):
        check_keys(params, where, cls.PARAMS)

    def __init__(self, name, params, model, masks, backend, where: Where, input_shape=None):
        self.name, self.params, self.model = name, params, model
        self.masks, self.backend, self.where = masks, backend, where
        self.input_shape = tuple(input_shape or model.shape)

    def process(self, calib) -> dict:
        raise NotImplementedError

    def child_map(self, per_pixel):
        """A per-pixel map of the detector (its noise) as a chained function sees it:
        cut as this function cuts the frames; None where its output is not those pixels."""
        same = self.output_shape is not None and tuple(self.output_shape) == self.input_shape
        return per_pixel if same and np.shape(per_pixel) == self.input_shape else None

    def config_items(self) -> dict:
        """Parameters for /UserDataCfg/<det>/<name>__<param>."""
        return {}


from . import autocorr, azimuthal, droplet, image, photons, projection, roi, sparsify, spectrum  # noqa: E402,F401,I001
