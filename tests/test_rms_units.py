"""Thresholds in rms units: the noise is taken in the units of the calibrated frames
(the rms of gain range 0 converted as the calibration converts gain range 0), so that
a droplet threshold of 5 means 5 sigma of noise whatever the gain convention."""
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.constants import Constants
from gpusmd.calib.dark import process_dark
from gpusmd.config import load_config, parse_config
from gpusmd.detectors import get_detector
from gpusmd.processor import DetectorProcessor, frame_rms
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run


# ---- hand-built case --------------------------------------------------------------------
@pytest.mark.parametrize("convention, noise", [
    ("divide", 4.0 / 40.0),          # keV: 4 ADU / 40 ADU/keV
    ("multiply", 4.0 * 40.0),        # psana1: 4 ADU x 40
    ("none", 4.0),                   # ADU
])
def test_threshold_is_rms_times_threshold_in_frame_units(convention, noise):
    """A Jungfrau 0.5M whose gain range 0 has rms 4 ADU and gain 40 ADU/keV (ranges 1 and
    2 other values, which must not matter): a one-pixel droplet is found where the pixel
    is just above 5 x rms in the frames' units, not where it is just below."""
    model = get_detector("jungfrau05M")
    c = Constants.default(model, pedestal=np.full((3, *model.shape), 1000, np.float32))
    c.rms[:] = np.array([4.0, 9.0, 30.0], np.float32).reshape(3, 1, 1, 1)
    c.gain[:] = np.array([40.0, 1.5, 0.1], np.float32).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(frame_rms(c, convention)[0, 100, 100], noise, rtol=1e-6)
    cfg = parse_config({"detectors": {"jungfrau05M": {
        "common_mode": 0, "gain_convention": convention,
        "functions": [{"kind": "droplet", "threshold": 5, "thresholdLow": 3, "thresADU": 0}]}}})
    proc = DetectorProcessor(cfg.detectors["jungfrau05M"], model, get_backend(), constants=c)
    raw = np.full((2, *model.shape), 1000, np.uint16)
    raw[0, 0, 100, 100] += 21                # 5.25 rms (gain range 0: raw bits 15-14 = 0)
    raw[1, 0, 100, 100] += 19                # 4.75 rms
    np.testing.assert_array_equal(proc.process(raw)["droplet_nDroplets"], [1, 0])


# ---- simulated runs ---------------------------------------------------------------------
@pytest.mark.parametrize("detector", ["jungfrau05M", "epix10kquad"])
def test_droplet_photons_match_simulation_on_multigain(tmp_path, detector):
    """Default droplet settings (smalldata_tools/ana_funcs/droplet.py, dropletFunc: seeds
    and growth at 5 rms, no thresADU cut) and droplet2photons' default photpts
    (droplet2Photons.py: a droplet of less than half a photon counts none) on keV frames
    of a multi-gain detector: the simulated photons are counted within 5%."""
    kev = 9.5
    kw = {"detector": detector, "seed": 3, "common_mode_scale": 0.0}
    simulate_run(tmp_path / "dark.h5", n_events=10, dark=True, **kw)
    process_dark(tmp_path / "dark.h5", tmp_path / "c.h5")
    data = simulate_run(tmp_path / "data.h5", n_events=4, photons_per_pixel=0.002,
                        bragg_spots=0, photon_energy_kev=kev, **kw)
    (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
        detectors:
          {detector}:
            calib: c.h5
            common_mode: 0
            functions:
              - {{kind: droplet}}
              - {{kind: droplet2photons, aduspphot: {kev}}}
        """))
    out = tmp_path / "out.h5"
    replay(data, load_config(tmp_path / "run.yaml"), out, get_backend(), progress=False)
    with h5py.File(out, "r") as f, h5py.File(data, "r") as h:
        got = f[f"{detector}/droplet2photons_nPhotons"][()]
        ndrop = f[f"{detector}/droplet_nDroplets"][()]
        good = f[f"UserDataCfg/{detector}/cmask"][()].reshape(-1) != 0
        t = h[f"truth/{detector}"]
        ev, pix, dep = (t[k][()] for k in ("deposit_event", "deposit_pixel", "deposit_keV"))
    truth = np.bincount(ev, weights=dep * good[pix], minlength=len(got)) / kev
    assert truth.sum() > 1000
    print(f"{detector}: {got.sum()} photons counted, {truth.sum():.1f} simulated, "
          f"{ndrop.sum()} droplets")
    assert abs(got.sum() - truth.sum()) < 0.05 * truth.sum()
    # no thresADU cut: the droplets include noise seeds, which hold no photon
    assert 0.8 * got.sum() < ndrop.sum()
