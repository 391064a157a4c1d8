"""psana2's det.raw.calib is the reference for the epix10k calibration's edge cases: pixels
in the undefined configuration (g set, ga not: no gain range in psana's
gain_maps_epix10ka_any_alg) and non-zero offsets in the constants (which psana's
calib_epix10ka_any does not subtract). A small simulated epix10kquad run written as XTC2,
psana reading it with its own detector class (epix10ka_raw_2_0_1), gpusmd's constants
given to it; gpusmd's calibration, through the NumPy path and through the kernels' host
build, equals psana's bit for bit."""
import textwrap

import h5py
import numpy as np
import pytest

from psana import DataSource   # a test requirement (CI installs psana): never skipped

from gpusmd import cuda
from gpusmd.backend import get_backend
from gpusmd.calib.calibrate import Calibrator, family_code
from gpusmd.calib.constants import Constants
from gpusmd.calib.psana_constants import to_psana
from gpusmd.config import load_config
from gpusmd.detectors import get_detector
from gpusmd.io.source import open_run
from gpusmd.io.xtc2 import write_xtc2
from gpusmd.replay import build_processors
from gpusmd.runinfo import RunInfo
from gpusmd.simulate import simulate_run

CPU = get_backend("cpu")
DET = "epix10kquad"
UNDEFINED = 4          # pixel configuration g without ga


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """run.xtc2 (3 events) with a mix of fixed, auto-ranged and undefined pixel
    configurations and switched pixels, and constants.h5 with random pedestals, gains,
    offsets and bad pixels."""
    d = tmp_path_factory.mktemp("psana_rules")
    model = get_detector(DET)
    raw = simulate_run(d / "run.h5", DET, n_events=3, seed=11)
    rng = np.random.default_rng(7)
    with h5py.File(raw, "a") as f:
        pc = rng.choice([0, 0, 12, 8, UNDEFINED], model.shape).astype(np.uint8)
        f[f"{DET}/config/pixel_config"][0] = pc
        f[f"{DET}/config/trbit"][0] = np.array([[1, 0, 0, 1]] * 4, np.uint8)
        frames = f[f"{DET}/raw"]
        for i in range(frames.shape[0]):
            switch = (rng.random(model.shape) < 0.2).astype(np.uint16) << 14
            frames[i] = frames[i] | switch
    write_xtc2(raw, d / "run.xtc2")
    c = Constants.default(model)
    c.pedestal[:] = rng.normal(1500, 30, c.pedestal.shape)
    c.gain[:] *= rng.uniform(0.9, 1.1, c.gain.shape).astype(np.float32)
    c.offset[:] = rng.normal(0, 5, c.offset.shape)
    c.status[:, rng.random(model.shape) < 0.002] = 1     # psana merges ranges 0-4 only
    c.save(d / "constants.h5", DET)
    return d, pc


def gpusmd_processor(d, common_mode):
    (d / f"cm{common_mode}.yaml").write_text(textwrap.dedent(f"""\
        detectors:
          {DET}:
            calib: constants.h5
            common_mode: {common_mode}
            mask: status
        """))
    config = load_config(d / f"cm{common_mode}.yaml")
    with open_run(d / "run.xtc2") as run:
        return build_processors(config, RunInfo.from_run(run), CPU)[DET]


def read_run(d):
    with open_run(d / "run.xtc2") as run:
        (b,) = list(run.batches(16, one_step=True))
        return b.frames[DET], int(b.steps[DET][0]), run.control_bits(DET, 0)


_PSANA = {}


def psana_calib(d, cmpars):
    """psana's det.raw.calib of every event, its constants gpusmd's: pedestals the
    pedestals alone, and the offsets as psana's pixel_offset (which it does not use)."""
    if (d, cmpars) not in _PSANA:
        _PSANA[d, cmpars] = _psana_calib(d, cmpars=cmpars)
    return _PSANA[d, cmpars]


def _psana_calib(d, **kwargs):
    ds = DataSource(files=str(d / "run.xtc2"), skip_calib_load="all")
    run = next(ds.runs())
    c = Constants.load(d / "constants.h5", DET)
    cc = to_psana(c, DET, "sim", run.runnum)
    meta = cc["pedestals"][1]
    assert np.array_equal(cc["pedestals"][0], c.pedestal)
    cc["pixel_offset"] = (c.offset.copy(), {**meta, "ctype": "pixel_offset"})
    run._calib_const[DET] = cc
    run.dsparms.calibconst = run._calib_const
    pdet = run.Detector(DET)
    return np.stack([pdet.raw.calib(evt, **kwargs) for evt in run.events()])


@pytest.mark.parametrize("cm", [0, 85])
def test_undefined_pixels_and_offsets_equal_psana(run_dir, cm):
    d, pc = run_dir
    frames, step, cb = read_run(d)
    proc = gpusmd_processor(d, cm)
    proc.process(frames, step)
    ours = np.asarray(proc.last_calib)
    theirs = psana_calib(d, cmpars=(7, 3, 100, 10) if cm else None)
    assert theirs.dtype == np.float32
    theirs = theirs.reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)
    # the cases are there: unmasked undefined pixels read their raw ADU (no common mode),
    # masked ones 0; every offset is non-zero
    mask = proc.calibrator.host_lut[7, :, 1].reshape(pc.shape)      # row 7: (0, mask)
    undefined = np.broadcast_to(pc == UNDEFINED, ours.shape)
    good = np.broadcast_to(mask != 0, ours.shape)
    assert (undefined & good).sum() > 1000 and (undefined & ~good).sum() > 10
    assert not ours[undefined & ~good].any()
    if not cm:
        adu = (frames & 0x3FFF).astype(np.float32)
        np.testing.assert_array_equal(ours[undefined & good], adu[undefined & good])
    assert np.count_nonzero(Constants.load(d / "constants.h5", DET).offset) > 0


def test_kernel_host_build_equals_psana(run_dir):
    """The calibration kernel (kernels/calibrate.cu through gain_decode.h) on the same
    frames: psana's numbers."""
    d, _ = run_dir
    frames, step, cb = read_run(d)
    proc = gpusmd_processor(d, 0)
    lut = proc.calibrator.host_lut
    model = get_detector(DET)
    ours = cuda.calibrate_host(frames.reshape(len(frames), -1), cb, lut, family_code(model))
    theirs = psana_calib(d, cmpars=None)
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
