"""The run config (YAML, DESIGN §10), validated before any work starts.

Every problem is reported as one ConfigError naming the file and the key, e.g.
``run.yaml: detectors.epix10k2M.functions[0].bounds: ...``. Checks that need the
detector's shape (ROI bounds) run when the detector's processor is built, still
before any output is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .backend import BACKEND_CHOICES
from .calib.calibrate import GAIN_CONVENTIONS
from .calib.masks import DEFAULT_MASK_OPTIONS, MASK_CHOICES
from .errors import ConfigError

COMPRESSIONS = ("gzip", "lz4", "none")
SUM_KEYS = ("calib", "calib_square", "calib_max")
SUM_PREFIXES = ("calib_thresADU", "calib_nhits")


class Where:
    """A location in the config file, for error messages."""

    def __init__(self, source: str, path: str = ""):
        self.source, self.path = source, path

    def __truediv__(self, key) -> "Where":
        if isinstance(key, int):
            return Where(self.source, f"{self.path}[{key}]")
        return Where(self.source, f"{self.path}.{key}" if self.path else str(key))

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.path}: {message}" if self.path
                           else f"{self.source}: {message}")


def check_keys(d, where: Where, allowed, required=()):
    if not isinstance(d, dict):
        raise where.error(f"expected a mapping, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise (where / key).error(f"unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in d:
            raise (where / key).error("required key is missing")


def check_type(value, types, where: Where, what: str):
    # bool is an int in Python; a YAML 'true' must not pass as a number
    if isinstance(value, bool) and bool not in types:
        raise where.error(f"expected {what}, got a boolean")
    if not isinstance(value, types):
        raise where.error(f"expected {what}, got {value!r}")
    return value


def check_choice(value, choices, where: Where):
    if value not in choices:
        raise where.error(f"{value!r} is not one of {', '.join(map(str, choices))}")
    return value


@dataclass
class FunctionConfig:
    kind: str
    name: str
    params: dict
    where: Where
    parent: str | None = None      # a function whose output this one takes


@dataclass
class DetectorConfig:
    name: str
    type: str | None
    calib: Path | None
    common_mode: int | list | None      # None: the detector's default code
    gain_convention: str
    mask: str
    mask_options: dict
    functions: list[FunctionConfig]
    sums: list[str]
    where: Where
    geometry: str | Path | None = None   # a .data / .poni path, or "psana-default"
    common_mode_convention: str = "psana2"  # how an explicit cmpars list is read
    common_mode_rules: str = "psana"        # or "gpusmd" (calib/common_mode.py)
    user_mask: Path | None = None           # a .npy of the raw shape, non-zero = good


ADDRESS_KEYS = ("ingest_in", "ingest_work", "ingest_ack", "sink_in")


@dataclass
class ServicesConfig:
    """Addresses and timing of the live services (DESIGN §2-3)."""
    ingest_in: str = "tcp://127.0.0.1:5550"     # publishers -> ingest (ingest binds)
    ingest_work: str = "tcp://127.0.0.1:5551"   # workers <-> ingest (ingest binds)
    ingest_ack: str = "tcp://127.0.0.1:5553"    # sink -> ingest acknowledgements (ingest binds)
    sink_in: str = "tcp://127.0.0.1:5552"       # workers, ingest -> sink (sink binds)
    heartbeat_s: float = 1.0        # how often a worker says it is alive
    worker_timeout_s: float = 5.0   # silence after which its batches go to another worker
    credits: int = 2                # batches a worker may hold
    max_pending_batches: int = 8    # batches waiting for a worker before the ingest stops reading
    max_in_flight_batches: int = 16  # batches sent to workers and not yet acknowledged by the sink
    batch_timeout_s: float = 0.2    # a partial batch waits no longer than this
    flush_s: float = 2.0            # the sink flushes the output at least this often
    hwm: int = 64                   # high-water mark (messages) of every socket
    log_every_s: float = 5.0
    curve_keys: Path | None = None  # directory from `gpusmd keys`: CurveZMQ on every link
    shared_memory: bool = True      # batches to the workers of the ingest's host through /dev/shm
    end_timeout_s: float = 30.0     # after an end, how long missing events are awaited
    end_quiet_s: float = 1.0        # an end without its begin_run's end_token (an older
    #                                 source, or forged) ends the run only once the source
    #                                 has been quiet this long
    max_error_rows: int = 1000      # /errors rows of a kind of problem per run; one counts the rest
    ack_timeout_s: float | None = None  # no ack for this long: unacknowledged batches are sent
    #                                   again (default 2 x (flush_s + worker_timeout_s))
    ingest_timeout_s: float = 10.0  # the sink closes a run incomplete when its ingest is silent this long
    preview: str | None = "tcp://127.0.0.1:5560"   # the sink's live preview (PUB; null: off)
    preview_hz: float = 2.0         # preview messages a second at most

    @property
    def ack_timeout(self) -> float:
        return self.ack_timeout_s or 2 * (self.flush_s + self.worker_timeout_s)


def parse_services(d, where: Where, base_dir: Path) -> ServicesConfig:
    defaults = ServicesConfig()
    allowed = tuple(ServicesConfig.__dataclass_fields__)
    check_keys(d, where, allowed)
    values = {}
    for key, value in d.items():
        default = getattr(defaults, key)
        if key == "preview" and not value:
            value = None                # null or empty: no preview
        elif key in ADDRESS_KEYS or key == "preview":
            check_type(value, (str,), where / key, "an address like tcp://host:port")
            if not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise (where / key).error(f"{value!r} is not a tcp://, ipc:// or inproc:// address")
        elif key == "curve_keys":
            check_type(value, (str,), where / key, "a keys directory")
            value = Path(value) if Path(value).is_absolute() else base_dir / value
            if not value.is_dir():
                raise (where / key).error(f"keys directory {value} not found "
                                          f"(make one with `gpusmd keys`)")
        elif isinstance(default, bool):
            check_type(value, (bool,), where / key, "true or false")
        else:
            check_type(value, (int, float) if isinstance(default, float) or default is None
                       else (int,),
                       where / key, "a number")
            if value <= 0:
                raise (where / key).error("must be positive")
        values[key] = value
    return ServicesConfig(**values)


@dataclass
class UserFunctionConfig:
    """A Python callable registered by name: frames of several detectors in, a dict of
    per-event arrays out (see gpusmd/examples.py)."""
    name: str
    function: object
    detectors: list[str]
    params: dict
    where: Where


def parse_user_function(d, where: Where, detectors) -> UserFunctionConfig:
    import importlib
    check_keys(d, where, ("name", "function", "detectors", "params"), required=("name", "function"))
    name = check_type(d["name"], (str,), where / "name", "a name")
    spec = check_type(d["function"], (str,), where / "function", "'module:function'")
    module, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise (where / "function").error(f"cannot load {spec!r}: {e}") from None
    if not callable(function):
        raise (where / "function").error(f"{spec!r} is not callable")
    dets = d.get("detectors") or list(detectors)
    check_type(dets, (list,), where / "detectors", "a list of detector names")
    for i, det in enumerate(dets):
        if det not in detectors:
            raise (where / "detectors" / i).error(f"{det!r} is not a configured detector")
    params = d.get("params") or {}
    check_type(params, (dict,), where / "params", "a mapping of keyword arguments")
    return UserFunctionConfig(name, function, dets, params, where)


@dataclass
class Config:
    source: str
    text: str
    detectors: dict[str, DetectorConfig]
    experiment: str = ""
    backend: str = "auto"
    batch_size: int = 16
    compression: str = "gzip"
    passthrough: bool | list = True
    services: ServicesConfig = field(default_factory=ServicesConfig)
    user_functions: list = field(default_factory=list)


def check_common_mode(value, type_name: str, where: Where, convention: str = "psana2"):
    """A code or a [mode, ...] list (None: the detector's default); checked against the
    detector when its type is known here (else when the detector is built, still before
    any work)."""
    from .calib.common_mode import all_codes, resolve
    from .detectors import DETECTORS
    if value is None:
        return None
    check_type(value, (int, list), where, "a common-mode code or a cmpars list [mode, ...]")
    if isinstance(value, int) and value not in all_codes():
        raise where.error(f"unknown common-mode code {value} "
                          f"(known: {', '.join(map(str, sorted(all_codes())))})")
    family = DETECTORS[type_name].family if type_name in DETECTORS else None
    try:
        resolve(family, value, check_family=family is not None, convention=convention)
    except ValueError as e:
        raise where.error(str(e)) from None
    return value


def check_sum_key(key, where: Where) -> str:
    check_type(key, (str,), where, "a sum name")
    if key in SUM_KEYS:
        return key
    for prefix in SUM_PREFIXES:
        if key.startswith(prefix):
            try:
                float(key[len(prefix):] or "0")
                return key
            except ValueError:
                pass
    raise where.error(f"unknown sum {key!r} (known: {', '.join(SUM_KEYS)}, "
                      f"calib_thresADU<N>, calib_nhits<N>)")


def parse_function(d, where: Where, kind_names: dict) -> FunctionConfig:
    from .features import FEATURES, KIND_ALIASES, canonical_kind   # late: features import this
    if not isinstance(d, dict):
        raise where.error("expected a mapping with at least 'kind'")
    if "kind" not in d:
        raise (where / "kind").error("required key is missing")
    kind = canonical_kind(d["kind"])
    if not isinstance(kind, str) or kind not in FEATURES:
        raise (where / "kind").error(f"{d['kind']!r} is not one of {', '.join(FEATURES)} "
                                     f"(or smalldata_tools' {', '.join(KIND_ALIASES)})")
    feature = FEATURES[kind]
    params = feature.canonical_params(
        {k: v for k, v in d.items() if k not in ("kind", "name", "parent")}, where)
    feature.check_params(params, where)
    parent = d.get("parent")
    if parent is not None:
        check_type(parent, (str,), where / "parent", "the name of an earlier function")
        if parent not in kind_names.get("__names__", ()):
            raise (where / "parent").error(f"no earlier function is named {parent!r}")
    # smalldata naming: a child is called <parent>_<its own name> (ROI_0_pj_ax_1)
    own = d.get("name") or feature.default_name_for(params, kind_names.get(kind, 0))
    check_type(own, (str,), where / "name", "a name")
    name = f"{parent}_{own}" if parent and not d.get("name") else own
    kind_names[kind] = kind_names.get(kind, 0) + 1
    kind_names.setdefault("__names__", []).append(name)
    return FunctionConfig(kind, name, params, where, parent)


def check_geometry(value, type_name: str, where: Where, base_dir: Path):
    """``geometry:``: "psana-default" (checked here when the detector type is known, else
    when the detector is built) or a psana ``.data`` / pyFAI ``.poni`` file relative to
    the config file. The file is read when the detector is built (gpusmd.geometry)."""
    from .detectors import DETECTORS
    from .geometry import GEOMETRY_SUFFIXES, PSANA_DEFAULT, psana_default_file
    check_type(value, (str,), where, f"a geometry file path or {PSANA_DEFAULT!r}")
    if value == PSANA_DEFAULT:
        if type_name in DETECTORS or type_name == "camera":
            try:
                psana_default_file(type_name)
            except ConfigError as e:
                raise where.error(str(e)) from None
        return value
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if path.suffix.lower() not in GEOMETRY_SUFFIXES:
        known = ", ".join(f"{k} ({v})" for k, v in GEOMETRY_SUFFIXES.items())
        raise where.error(f"{path}: unknown geometry format {path.suffix or '(no suffix)'!r} "
                          f"(known: {known}, or {PSANA_DEFAULT})")
    if not path.is_file():
        raise where.error(f"geometry file {path} not found")
    return path


AZAV_GEOMETRY_KEYS = ("poni", "center", "dis_to_sam", "tx", "ty")


def with_detector_poni(functions, poni: Path):
    """A detector-level .poni is the ``poni:`` of each azav that gives no geometry of its
    own (no poni, center, dis_to_sam, tx, ty): a function's own keys win."""
    return [{**f, "poni": str(poni)} if isinstance(f, dict) and f.get("kind") == "azav"
            and not any(k in f for k in AZAV_GEOMETRY_KEYS) else f for f in functions]


def parse_detector(name, d, where: Where, base_dir: Path) -> DetectorConfig:
    allowed = ("type", "calib", "common_mode", "common_mode_convention", "common_mode_rules",
               "gain_convention", "mask", "mask_options", "functions", "sums", "geometry",
               "userMask")
    check_keys(d, where, allowed)
    geometry = d.get("geometry")
    if geometry is not None:
        geometry = check_geometry(geometry, d.get("type") or name, where / "geometry", base_dir)
    calib = d.get("calib")
    if calib is not None:
        check_type(calib, (str,), where / "calib", "a constants file path")
        calib = Path(calib) if Path(calib).is_absolute() else base_dir / calib
        if not calib.exists():
            raise (where / "calib").error(f"constants file {calib} not found")
    user_mask = d.get("userMask")
    if user_mask is not None:
        check_type(user_mask, (str,), where / "userMask", "a .npy mask file path")
        user_mask = Path(user_mask) if Path(user_mask).is_absolute() else base_dir / user_mask
        if not user_mask.is_file():
            raise (where / "userMask").error(f"user mask file {user_mask} not found")
    from .calib.common_mode import CONVENTIONS, RULES
    cm_convention = check_choice(d.get("common_mode_convention", "psana2"), CONVENTIONS,
                                 where / "common_mode_convention")
    cm_rules = check_choice(d.get("common_mode_rules", "psana"), RULES,
                            where / "common_mode_rules")
    cm = check_common_mode(d.get("common_mode"), d.get("type") or name, where / "common_mode",
                           cm_convention)
    mask_options = dict(d.get("mask_options") or {})
    check_keys(mask_options, where / "mask_options", tuple(DEFAULT_MASK_OPTIONS))
    for key, value in mask_options.items():
        if key == "status_neighbours":
            check_choice(value, (0, 4, 8), where / "mask_options" / key)
        else:
            check_type(value, (bool,), where / "mask_options" / key, "true or false")
    functions = d.get("functions") or []
    check_type(functions, (list,), where / "functions", "a list of functions")
    if isinstance(geometry, Path) and geometry.suffix.lower() == ".poni":
        functions = with_detector_poni(functions, geometry)
    kind_names: dict = {}
    funcs = [parse_function(f, where / "functions" / i, kind_names)
             for i, f in enumerate(functions)]
    names = [f.name for f in funcs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise (where / "functions").error(f"function names must be unique, repeated: {sorted(dup)}")
    sums = d.get("sums") or []
    check_type(sums, (list,), where / "sums", "a list of sum names")
    type_ = d.get("type")
    if type_ is not None:
        check_type(type_, (str,), where / "type", "a detector type")
    return DetectorConfig(
        name=name, type=type_, calib=calib, common_mode=cm,
        gain_convention=check_choice(d.get("gain_convention", "divide"), GAIN_CONVENTIONS,
                                     where / "gain_convention"),
        mask=check_choice(d.get("mask", "cmask"), MASK_CHOICES, where / "mask"),
        mask_options=mask_options, functions=funcs,
        sums=[check_sum_key(s, where / "sums" / i) for i, s in enumerate(sums)], where=where,
        geometry=geometry, common_mode_convention=cm_convention, common_mode_rules=cm_rules,
        user_mask=user_mask)


def parse_config(data, source: str = "<config>", base_dir: Path | None = None, text: str = "") -> Config:
    where = Where(source)
    base_dir = base_dir or Path.cwd()
    allowed = ("experiment", "backend", "batch_size", "compression", "passthrough", "detectors",
               "services", "user_functions")
    check_keys(data, where, allowed, required=("detectors",))
    dets = data["detectors"]
    check_keys(dets, where / "detectors", tuple(dets) if isinstance(dets, dict) else ())
    if not dets:
        raise (where / "detectors").error("no detectors configured")
    batch = check_type(data.get("batch_size", 16), (int,), where / "batch_size", "an integer")
    if batch < 1:
        raise (where / "batch_size").error("must be at least 1")
    passthrough = data.get("passthrough", True)
    if not isinstance(passthrough, bool):
        check_type(passthrough, (list,), where / "passthrough", "true, false or a list of names")
    return Config(
        source=source, text=text,
        detectors={n: parse_detector(n, d or {}, where / "detectors" / n, base_dir)
                   for n, d in dets.items()},
        experiment=str(data.get("experiment", "")),
        backend=check_choice(data.get("backend", "auto"), BACKEND_CHOICES, where / "backend"),
        batch_size=batch,
        compression=check_choice(data.get("compression", "gzip"), COMPRESSIONS, where / "compression"),
        passthrough=passthrough,
        services=parse_services(data.get("services") or {}, where / "services", base_dir),
        user_functions=[parse_user_function(u, where / "user_functions" / i, dets)
                        for i, u in enumerate(check_type(data.get("user_functions") or [], (list,),
                                                         where / "user_functions", "a list"))])


def load_config(path) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from None
    return parse_config(data, str(path), path.parent, text)
