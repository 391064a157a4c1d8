"""sparsify (hand-built frames, fixed and variable length, chained on an ROI through a
replay and read back from the file) and droplet -> droplet2photons chaining (equal to a
standalone droplet2photons, config errors)."""
import textwrap

import h5py
import numpy as np
import pytest

import gpusmd.features.sparsify  # noqa: F401  (registers "sparsify" until features/__init__ does)
from gpusmd.backend import get_backend
from gpusmd.calib.dark import process_dark
from gpusmd.config import Where, load_config
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features import FEATURES, Ragged, flatten_columns, unflatten_columns
from gpusmd.features.droplet import Droplet, DropletOutput, Droplets
from gpusmd.features.photons import Droplet2Photons
from gpusmd.features.sparsify import Sparsify
from gpusmd.io.raw import RawRun
from gpusmd.replay import build_processors, replay
from gpusmd.runinfo import RunInfo
from gpusmd.simulate import simulate_run

from conftest import backend_or_skip

BACKEND = backend_or_skip()       # GPUSMD_BACKEND=gpu runs these on the device
CAM = get_detector("camera", (10, 12))
W = Where("test.yaml", "sparse")


def build(cls, params, model=CAM, shape=None, rms=None):
    shape = shape if shape is not None else tuple(model.shape)
    cls.check_params(params, W)
    masks = {"cmask": np.ones(tuple(shape), np.uint8)}
    extra = {} if rms is None else {"rms": rms}
    return cls("f", params, model, masks, BACKEND, W, input_shape=shape, **extra)


def run(feature, frames):
    data = BACKEND.asarray(frames) if isinstance(frames, np.ndarray) else frames
    out = feature.process(data)
    return {k: (v.to_host(BACKEND) if isinstance(v, Ragged) else BACKEND.to_host(v))
            for k, v in out.items()}


def hand_frames():
    f = np.zeros((3, 10, 12), np.float32)
    f[0, 1, 2] = 5.0
    f[0, 1, 1] = -2.0        # negative: kept without thresADU (non-zero), dropped with it
    f[0, 9, 11] = 0.5
    f[2, 4, 7] = 100.0       # event 1: nothing
    return f


def test_registered():
    assert FEATURES["sparsify"] is Sparsify
    assert Sparsify.default_name_for({}, 0) == "sparse"
    assert Sparsify.default_name_for({}, 2) == "sparse_2"


def test_variable_length_nonzero_and_threshold():
    out = run(build(Sparsify, {}), hand_frames())
    assert set(out) == {"var"}
    r = out["var"]
    np.testing.assert_array_equal(r.lengths, [3, 0, 1])
    np.testing.assert_allclose(r.fields["data"], [-2, 5, 0.5, 100])      # raster order
    np.testing.assert_array_equal(r.fields["row"], [1, 1, 9, 4])
    np.testing.assert_array_equal(r.fields["col"], [1, 2, 11, 7])
    np.testing.assert_array_equal(r.fields["tile"], 0)
    assert r.fields["data"].dtype == np.float32 and r.fields["row"].dtype == np.int16
    r = run(build(Sparsify, {"thresADU": 1}), hand_frames())["var"]
    np.testing.assert_array_equal(r.lengths, [1, 0, 1])
    np.testing.assert_allclose(r.fields["data"], [5, 100])
    r = run(build(Sparsify, {"thresADU": 0}), hand_frames())["var"]    # > 0: positives
    np.testing.assert_allclose(r.fields["data"], [5, 0.5, 100])


def test_fixed_length_zero_padded_with_true_count():
    out = run(build(Sparsify, {"nData": 2}), hand_frames())
    assert "var" not in out
    np.testing.assert_allclose(out["data"], [[-2, 5], [0, 0], [100, 0]])
    np.testing.assert_array_equal(out["row"], [[1, 1], [0, 0], [4, 0]])
    np.testing.assert_array_equal(out["col"], [[1, 2], [0, 0], [7, 0]])
    np.testing.assert_array_equal(out["tile"], 0)
    np.testing.assert_array_equal(out["n"], [3, 0, 1])                 # not capped by nData
    out = run(build(Sparsify, {"nData": 5, "thresADU": 0.1}), hand_frames())
    assert out["data"].shape == (3, 5)
    np.testing.assert_allclose(out["data"][0], [5, 0.5, 0, 0, 0])
    np.testing.assert_array_equal(out["n"], [2, 0, 1])


def test_segments_give_tiles_and_1d_inputs():
    f = np.zeros((2, 3, 4, 5), np.float32)
    f[0, 2, 3, 4] = 7
    f[0, 0, 0, 1] = 1
    f[1, 1, 2, 0] = 3
    r = run(build(Sparsify, {}, shape=(3, 4, 5)), f)["var"]
    np.testing.assert_array_equal(r.lengths, [2, 1])
    np.testing.assert_array_equal(r.fields["tile"], [0, 2, 1])
    np.testing.assert_array_equal(r.fields["row"], [0, 3, 2])
    np.testing.assert_array_equal(r.fields["col"], [1, 4, 0])
    np.testing.assert_allclose(r.fields["data"], [1, 7, 3])
    line = np.array([[0, 2, 0, 4], [1, 0, 0, 0]], np.float32)       # e.g. a lineout
    r = run(build(Sparsify, {}, shape=(4,)), line)["var"]
    np.testing.assert_array_equal(r.fields["col"], [1, 3, 0])
    np.testing.assert_array_equal(r.fields["row"], 0)


@pytest.mark.parametrize("params", [{"nData": 0}, {"nData": 2.5}, {"thresADU": "x"},
                                    {"thresADU": True}, {"threshold": 3}])
def test_bad_params(params):
    with pytest.raises(ConfigError):
        Sparsify.check_params(params, W)


def test_bad_input_shape():
    with pytest.raises(ConfigError, match="1-, 2- or 3-D"):
        build(Sparsify, {}, shape=(2, 3, 4, 5))


def test_ragged_round_trips_the_wire():
    out = run(build(Sparsify, {}), hand_frames())
    back = unflatten_columns(flatten_columns({"var_sparse": out["var"]}))["var_sparse"]
    np.testing.assert_array_equal(back.lengths, out["var"].lengths)
    for k, v in out["var"].fields.items():
        np.testing.assert_array_equal(back.fields[k], v)


# ---- through a replay: chained on an ROI ---------------------------------------------
DET = "epix10kquad"
BOUNDS = [[1, 3], [10, 60], [20, 90]]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparsify")
    dark = simulate_run(d / "dark.h5", DET, n_events=6, dark=True, seed=7, run=1,
                        common_mode_scale=0.0)
    data = simulate_run(d / "run.h5", DET, n_events=7, seed=7, run=2, common_mode_scale=0.0)
    process_dark(dark, d / "constants.h5")
    (d / "run.yaml").write_text(textwrap.dedent(f"""\
        batch_size: 3
        detectors:
          {DET}:
            calib: constants.h5
            functions:
              - {{kind: roi, name: ROI_0, bounds: {BOUNDS}, thresADU: [5.0, null], writeArea: true}}
              - {{kind: sparsify, parent: ROI_0}}
              - {{kind: sparsify, parent: ROI_0, nData: 40}}
              - {{kind: sparsify, name: sparse, thresADU: 30.0}}
              - {{kind: droplet, threshold: 5, thresholdLow: 3, thresADU: 5}}
              - {{kind: droplet2photons, parent: droplet, aduspphot: 9.5}}
              - {{kind: droplet2photons, name: d2p, threshold: 5, thresholdLow: 3,
                  thresADU: 5, aduspphot: 9.5}}
        """))
    config = load_config(d / "run.yaml")
    out = d / "out.h5"
    replay(data, config, out, get_backend(), progress=False)
    # the calibrated frames the features saw: one processor, one batch of all events
    with RawRun(data) as raw:
        proc = build_processors(config, RunInfo.from_run(raw), get_backend("cpu"))[DET]
        proc.process(raw.read(DET, 0, raw.n_events))
    calib = np.asarray(proc.last_calib)
    return d, out, calib, proc.masks["cmask"]


def test_sparse_of_roi_in_the_file(replayed):
    _, out, calib, cmask = replayed
    sl = tuple(slice(lo, hi) for lo, hi in BOUNDS)
    roi = calib[(slice(None), *sl)]
    roi = np.where(roi < 5.0, 0, roi) * cmask[sl]
    with h5py.File(out, "r") as f:
        g = f[DET]
        np.testing.assert_allclose(g["ROI_0_area"][()], roi, rtol=1e-5, atol=1e-4)
        area = g["ROI_0_area"][()]
        lengths = g["var_ROI_0_sparse_len"][()]
        rec = {k: g[f"var_ROI_0_sparse/{k}"][()] for k in ("data", "row", "col", "tile")}
        fixed = {k: g[f"ROI_0_sparse_1_{k}"][()] for k in ("data", "row", "col", "tile", "n")}
        assert "ROI_0_sparse_1_n" in g and "var_ROI_0_sparse_1" not in g
        assert f[f"UserDataCfg/{DET}/ROI_0_sparse__nData"][()] == -1
        assert f[f"UserDataCfg/{DET}/ROI_0_sparse_1__nData"][()] == 40
    n = len(area)
    assert lengths.shape == (n,) and lengths.sum() == len(rec["data"]) > 20
    ev = np.repeat(np.arange(n), lengths)
    # ROI-relative coordinates: every non-zero pixel of the ROI image, once, in order
    want_ev, want_t, want_r, want_c = np.nonzero(area != 0)
    np.testing.assert_array_equal(ev, want_ev)
    np.testing.assert_array_equal(rec["tile"], want_t)
    np.testing.assert_array_equal(rec["row"], want_r)
    np.testing.assert_array_equal(rec["col"], want_c)
    np.testing.assert_array_equal(rec["data"], area[want_ev, want_t, want_r, want_c])
    # + the ROI's lower bounds: the detector pixel in the calibrated frames
    np.testing.assert_allclose(
        rec["data"], calib[ev, rec["tile"] + BOUNDS[0][0], rec["row"] + BOUNDS[1][0],
                           rec["col"] + BOUNDS[2][0]], rtol=1e-5)
    # fixed length: the first 40 records of each event, zero-padded; n the true count
    np.testing.assert_array_equal(fixed["n"], lengths)
    starts = np.cumsum(lengths) - lengths
    for e in range(n):
        k = min(40, lengths[e])
        for key in ("data", "row", "col", "tile"):
            np.testing.assert_array_equal(fixed[key][e, :k], rec[key][starts[e]:starts[e] + k])
            np.testing.assert_array_equal(fixed[key][e, k:], 0)


def test_sparse_of_detector_frames(replayed):
    _, out, calib, _ = replayed
    with h5py.File(out, "r") as f:
        g = f[DET]
        lengths = g["var_sparse_len"][()]
        rec = {k: g[f"var_sparse/{k}"][()] for k in ("data", "row", "col", "tile")}
    want = np.nonzero(calib > 30.0)
    np.testing.assert_array_equal(np.repeat(np.arange(len(calib)), lengths), want[0])
    np.testing.assert_array_equal(rec["tile"], want[1])
    np.testing.assert_array_equal(rec["row"], want[2])
    np.testing.assert_array_equal(rec["col"], want[3])
    np.testing.assert_allclose(rec["data"], calib[want], rtol=1e-6)


def test_chained_droplet2photons_equals_standalone_in_the_file(replayed):
    _, out, _, _ = replayed
    with h5py.File(out, "r") as f:
        g = f[DET]
        assert "droplet_droplet2photons_nPhotons" in g
        chained = {k: g[k][()] for k in g if k.startswith("droplet_droplet2photons")}
        chained.update({f"var_droplet_droplet2photons/{k}": g[f"var_droplet_droplet2photons/{k}"][()]
                        for k in g["var_droplet_droplet2photons"]})
        assert g["d2p_nPhotons"][()].sum() > 10
        for key, value in chained.items():
            other = key.replace("droplet_droplet2photons", "d2p")
            np.testing.assert_array_equal(value, g[other][()], err_msg=key)
        cfg = f[f"UserDataCfg/{DET}"]
        for p in ("threshold", "thresholdLow", "thresADU", "useRms", "aduspphot"):
            assert cfg[f"droplet_droplet2photons__{p}"][()] == cfg[f"d2p__{p}"][()]


# ---- droplet -> droplet2photons, in process --------------------------------------------
ADU = {"useRms": False, "threshold": 5, "thresholdLow": 3, "thresADU": 8}


def random_frames(shape, seed=2):
    rng = np.random.default_rng(seed)
    f = rng.normal(0, 1, (4, *shape)).astype(np.float32)
    lit = rng.random(f.shape) < 0.05
    f[lit] += rng.uniform(5, 80, lit.sum())
    return f


@pytest.mark.parametrize("shape", [(10, 12), (3, 16, 20)])
@pytest.mark.parametrize("extra", [{}, {"nData": 5}])
def test_chained_droplet2photons_equals_standalone(shape, extra):
    model = get_detector("camera", shape) if len(shape) == 2 else get_detector("camera", shape[1:])
    masks = {"cmask": (np.random.default_rng(0).random(shape) > 0.05).astype(np.uint8)}
    frames = random_frames(shape)
    parent = Droplet("droplet", {**ADU, "nData": 3}, model, masks, BACKEND, W, input_shape=shape)
    assert isinstance(parent.output_shape, DropletOutput)
    assert tuple(parent.output_shape) == shape
    child = Droplet2Photons("droplet_d2p", {"aduspphot": 10, **extra}, model, masks, BACKEND, W,
                            input_shape=parent.output_shape)
    alone = Droplet2Photons("d2p", {**ADU, "aduspphot": 10, **extra}, model, masks, BACKEND,
                            W, input_shape=shape)
    droplets = run(parent, frames)
    assert isinstance(parent.child_data, Droplets) and len(parent.child_data) == 4
    got = run(child, parent.child_data)
    want = run(alone, frames)
    assert set(got) == set(want)
    assert want["nPhotons"].sum() > 20
    for key in want:
        if isinstance(want[key], Ragged):
            np.testing.assert_array_equal(got[key].lengths, want[key].lengths)
            for f in want[key].fields:
                np.testing.assert_array_equal(got[key].fields[f], want[key].fields[f])
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert child.config_items() == alone.config_items()
    # the parent's own output is unchanged by having a child
    plain = Droplet("droplet", {**ADU, "nData": 3}, model, masks, BACKEND, W, input_shape=shape)
    for key, value in run(plain, frames).items():
        np.testing.assert_array_equal(droplets[key], value)
    assert plain.child_data is None           # no child: the label map is not kept


def test_chained_droplet2photons_uses_the_parents_rms():
    rms = np.full(CAM.shape, 2.0, np.float32)
    frames = random_frames(CAM.shape, seed=4) * 2
    p = {"threshold": 5, "thresholdLow": 3, "thresADU": 8}
    parent = build(Droplet, p, rms=rms)
    child = Droplet2Photons("c", {"aduspphot": 10}, CAM, {"cmask": np.ones(CAM.shape, np.uint8)},
                            BACKEND, W, input_shape=parent.output_shape, rms=None)
    alone = build(Droplet2Photons, {**p, "aduspphot": 10}, rms=rms)
    run(parent, frames)
    np.testing.assert_array_equal(run(child, parent.child_data)["nPhotons"],
                                  run(alone, frames)["nPhotons"])


@pytest.mark.parametrize("key", ["threshold", "thresholdLow", "thresADU", "useRms", "mask"])
def test_chained_droplet2photons_refuses_droplet_params(key):
    parent = build(Droplet, ADU)
    value = {"useRms": False, "mask": "cmask", "thresholdLow": 2}.get(key, 6)
    with pytest.raises(ConfigError, match=rf"\.{key}: chained on a droplet"):
        Droplet2Photons("c", {"aduspphot": 10, key: value}, CAM, {"cmask": np.ones(CAM.shape)},
                        BACKEND, W, input_shape=parent.output_shape)


def test_droplet_of_a_droplet_is_refused():
    parent = build(Droplet, ADU)
    with pytest.raises(ConfigError, match="another droplet"):
        Droplet("d", ADU, CAM, {"cmask": np.ones(CAM.shape)}, BACKEND, W,
                input_shape=parent.output_shape)


def test_config_error_names_the_key(tmp_path):
    simulate_run(tmp_path / "cam.h5", "camera", n_events=2, shape=(16, 16), seed=1)
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        detectors:
          camera:
            functions:
              - {kind: droplet, useRms: false, threshold: 5, thresholdLow: 3}
              - {kind: droplet2photons, parent: droplet, aduspphot: 10, thresADU: 4}
        """))
    with pytest.raises(ConfigError, match=r"functions\[1\]\.thresADU: chained on a droplet"):
        replay(tmp_path / "cam.h5", load_config(tmp_path / "c.yaml"), tmp_path / "o.h5",
               get_backend(), progress=False)
