"""Azimuthal integration: hand-built cases, config errors, and agreement with pyFAI."""
import dataclasses
import re

import numpy as np
import pytest

from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features import FEATURES
from gpusmd.features.azimuthal import (
    HC_PYFAI_KEV_A,
    AzimuthalIntegration,
    image_origin,
    read_poni,
    smalldata_to_pyfai,
)

from conftest import backend_or_skip

BACKEND = backend_or_skip()       # GPUSMD_BACKEND=gpu runs these on the device
WHERE = Where("test.yaml", "detectors.cam.functions[0]")
SMALL = get_detector("camera", (21, 31))
CAM = get_detector("camera", (512, 512))


def make(params, model=SMALL, mask=None):
    mask = np.ones(model.shape, np.uint8) if mask is None else mask
    AzimuthalIntegration.check_params(params, WHERE)
    return AzimuthalIntegration("azav_0", params, model, {"cmask": mask}, BACKEND, WHERE)


def run(feature, frames):
    out = feature.process(BACKEND.asarray(np.asarray(frames, np.float32)))
    return BACKEND.to_host(out["azav"])


BASE = {"center": [0.0, 0.0], "dis_to_sam": 50.0, "eBeam": 9.5}


def test_registered_with_default_name():
    assert FEATURES["azav"] is AzimuthalIntegration
    assert AzimuthalIntegration.default_name(2) == "azav_2"


def test_geometry_no_tilt_by_hand():
    f = make({**BASE, "center": [100.0, -200.0], "polarization": False, "qbin": 0.01})
    x, y, _ = SMALL.coords_um()
    dx, dy = (x.astype(float) - 100.0) / 1e3, (y.astype(float) + 200.0) / 1e3
    r = np.sqrt(dx ** 2 + dy ** 2 + 50.0 ** 2)
    tth = np.arctan2(np.hypot(dx, dy), 50.0)
    # smalldata's arccos loses ~1e-9 relative near the beam
    np.testing.assert_allclose(f.q_map, 4 * np.pi * 9.5 / 12.3984 * np.sin(tth / 2), rtol=1e-8)
    np.testing.assert_allclose(f.correction, (50.0 / r) ** 3, rtol=1e-12)
    # phi from +y towards +x, in [0, 2 pi) (smalldata's arccos: ~5e-6 rad off near 0 and pi)
    np.testing.assert_allclose(f.phi_map, np.mod(np.arctan2(dx, dy), 2 * np.pi), atol=1e-5)


def test_polarization_formula():
    f = make({**BASE, "solidangle": False, "Pplane": 0.8})
    s, phi = np.sin(f.tth_map), f.phi_map
    expected = 0.2 * (1 - (np.sin(phi) * s) ** 2) + 0.8 * (1 - (np.cos(phi) * s) ** 2)
    np.testing.assert_allclose(f.correction, expected, rtol=1e-12)


def test_mean_per_bin_by_hand_and_empty_bins_nan():
    """Three q bins, 2 phi bins: the mean over good pixels of value / correction."""
    mask = np.ones(SMALL.shape, np.uint8)
    mask[3, 4] = 0
    f0 = make({**BASE, "qbin": 0.01}, mask=mask)
    qmax = f0.q_map.max()
    edges = [0.0, qmax / 3, 2 * qmax / 3, qmax * 1.001, qmax * 2]          # last bin empty
    f = make({**BASE, "qedges": edges, "phiedges": [0, 180, 360], "thresADU": [-50.0, 500.0]},
             mask=mask)
    rng = np.random.default_rng(1)
    frames = rng.uniform(0, 100, (3, *SMALL.shape)).astype(np.float32)
    frames[1, 5, 5] = 1000.0           # above thresADU high: counts as 0
    frames[2, 6, 6] = -60.0            # below low: counts as 0
    out = run(f, frames)
    assert out.shape == (3, 2, 4) and out.dtype == np.float32
    assert np.all(np.isnan(out[:, :, 3]))
    vals = np.where((frames < -50) | (frames > 500), 0, frames) / f.correction
    iq = np.digitize(f.q_map, edges) - 1
    iphi = (f.phi_map >= np.pi).astype(int)
    for b in range(3):
        for p in range(2):
            for q in range(3):
                sel = (iq == q) & (iphi == p) & (mask == 1)
                assert f.counts[p, q] == sel.sum()
                np.testing.assert_allclose(out[b, p, q], vals[b][sel].mean(), rtol=2e-6)
    assert f.counts.sum() == mask.sum()


def test_phiedges_degrees_and_config_items():
    f = make({**BASE, "qbin": 0.02, "phiedges": [-90, 0, 90], "qmin": 0.0, "qmax": 0.1})
    _, y, _ = SMALL.coords_um()
    # phi in [-90, 90) degrees: y >= 0 side
    assert np.all(f.pixel_bin[y < -1] == -1)
    assert np.all(f.pixel_bin[(y > 1) & (f.q_map < 0.1)] >= 0)
    items = f.config_items()
    np.testing.assert_allclose(items["q_edges"], [0, 0.02, 0.04, 0.06, 0.08, 0.1], atol=1e-12)
    np.testing.assert_allclose(items["q"], [0.01, 0.03, 0.05, 0.07, 0.09], atol=1e-12)
    np.testing.assert_allclose(items["phi_edges"], [-90, 0, 90])
    assert items["npix"].shape == (2, 5)
    out = run(f, np.ones((1, *SMALL.shape)))
    assert out.shape == (1, 2, 5)


def test_batch_size_change_reuses_nothing_stale():
    f = make({**BASE, "qbin": 0.01})
    rng = np.random.default_rng(2)
    frames = rng.normal(10, 1, (4, *SMALL.shape))
    a = run(f, frames)
    b = np.concatenate([run(f, frames[:1]), run(f, frames[1:])])
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("params, key", [
    ({"dis_to_sam": 50.0, "eBeam": 9.5}, "center"),
    ({**BASE, "center": [1.0]}, "center"),
    ({**BASE, "center": "0,0"}, "center"),
    ({**BASE, "center": [0, "a"]}, "center[1]"),
    ({"center": [0, 0], "eBeam": 9.5}, "dis_to_sam"),
    ({**BASE, "dis_to_sam": -5}, "dis_to_sam"),
    ({**BASE, "eBeam": True}, "eBeam"),
    ({**BASE, "qbin": 0.1, "qedges": [0, 1]}, "qedges"),
    ({**BASE, "qedges": [0, 2, 1]}, "qedges"),
    ({**BASE, "phiBins": 2.5}, "phiBins"),
    ({**BASE, "phiBins": []}, "phiBins"),
    ({**BASE, "phiBins": [0.0, 90.0]}, "phiBins[1]"),
    ({**BASE, "qbin": [0.1]}, "qbin"),
    ({**BASE, "qbin": [0.1, 0.05]}, "qbin"),
    ({**BASE, "qbin": [0.0, 0.1], "qmax": 1.0}, "qmax"),
    ({**BASE, "phiBins": 2, "phiedges": [0, 90]}, "phiedges"),
    ({**BASE, "Pplane": 1.5}, "Pplane"),
    ({**BASE, "polarization": "yes"}, "polarization"),
    ({**BASE, "thresADU": [5, 1]}, "thresADU"),
    ({**BASE, "poni": "x.poni"}, "center"),
    ({**BASE, "bogus": 1}, "bogus"),
])
def test_config_errors_name_the_key(params, key):
    with pytest.raises(ConfigError, match=r"functions\[0\]\." + re.escape(key) + ":"):
        AzimuthalIntegration.check_params(params, WHERE)


def test_constructor_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\.mask: unknown mask"):
        make({**BASE, "mask": "nope"})
    with pytest.raises(ConfigError, match=r"\.userMask: .*not found"):
        make({**BASE, "userMask": str(tmp_path / "none.npy")})
    with pytest.raises(ConfigError, match=r"\.poni: .*not found"):
        make({"poni": str(tmp_path / "none.poni")})
    with pytest.raises(ConfigError, match=r"functions\[0\]: azav works on the detector's frames"):
        AzimuthalIntegration("azav_0", BASE, SMALL, {"cmask": np.ones(SMALL.shape)}, BACKEND,
                             WHERE, input_shape=(5, 31))


# ---- pyFAI -------------------------------------------------------------------------
# pyFAI (test extra): only these tests are skipped without it


def pyfai_for(model, center, dist, tx, ty, ebeam, pplane):
    pytest.importorskip("pyFAI")
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    x, y, _ = model.coords_um()
    p = model.pixel_size_um
    geo = smalldata_to_pyfai(center, dist, tx, ty, ebeam, image_origin(x, y, p, p), pplane)
    shape = model.shape[-2:]           # the assembled image is the raw frame (one segment)
    det = Detector(p * 1e-6, p * 1e-6, max_shape=shape)
    ai = AzimuthalIntegrator(dist=geo["dist"], poni1=geo["poni1"], poni2=geo["poni2"],
                             rot1=geo["rot1"], rot2=geo["rot2"], rot3=geo["rot3"],
                             detector=det, wavelength=geo["wavelength"])
    return ai, geo


CASES = [  # model, centre (um), distance (mm), tx, ty (deg), Pplane, mask kind
    (CAM, (1000.0, -2000.0), 80.0, 0.0, 0.0, 1.0, "none"),
    (CAM, (3000.0, 500.0), 60.0, 3.0, -5.0, 0.9, "stripes"),
    (CAM, (-500.0, 800.0), 100.0, -10.0, 7.0, 0.0, "random"),
    (get_detector("jungfrau05M"), (-9000.0, 4000.0), 120.0, 2.0, 1.0, 0.5, "stripes"),
]


@pytest.mark.parametrize("model, center, dist, tx, ty, pplane, maskkind", CASES)
@pytest.mark.parametrize("polarization", [True, False])
def test_agrees_with_pyfai_integrate1d(model, center, dist, tx, ty, pplane, maskkind,
                                       polarization):
    ebeam, npt = 9.5, 120
    ai, geo = pyfai_for(model, center, dist, tx, ty, ebeam, pplane)
    good = np.ones(model.shape, np.uint8)
    if maskkind == "stripes":
        good[..., 100:120, :] = 0
        good[..., :, 300:310] = 0
    elif maskkind == "random":
        good = (np.random.default_rng(3).random(model.shape) > 0.2).astype(np.uint8)
    params = {"center": list(center), "dis_to_sam": dist, "eBeam": ebeam, "tx": tx, "ty": ty,
              "Pplane": pplane, "polarization": polarization}
    probe = make({**params, "qbin": 0.01}, model, good)
    # geometry: pyFAI's maps equal ours
    img_shape = model.shape[-2:]
    np.testing.assert_allclose(ai.array_from_unit(unit="q_A^-1", typ="center"),
                               probe.q_map.reshape(img_shape), rtol=1e-9, atol=1e-12)
    qlo, qhi = np.quantile(probe.q_map, [0.02, 0.98])
    f = make({**params, "qedges": np.linspace(qlo, qhi, npt + 1).tolist()}, model, good)
    pol_factor = geo["polarization_factor"] if polarization else None
    corr = ai.solidAngleArray() * (ai.polarization(factor=pol_factor) if polarization else 1)
    np.testing.assert_allclose(corr, f.correction.reshape(img_shape), rtol=1e-6)
    q = f.q_map.reshape(img_shape)
    image = ((1000 + 300 * np.sin(3 * q) + 50 * q) * corr).astype(np.float32)
    # pyFAI's histogram engine puts out-of-range pixels in its end bins: mask them
    pmask = (good.reshape(img_shape) == 0) | (q < qlo) | (q > qhi)
    res = ai.integrate1d(image, npt, unit="q_A^-1", correctSolidAngle=True,
                         polarization_factor=pol_factor, method=("no", "histogram", "cython"),
                         mask=pmask, radial_range=(qlo, qhi))
    ours = run(f, image.reshape(1, *model.shape))[0, 0]
    np.testing.assert_allclose(res.radial, f.config_items()["q"], rtol=1e-6)
    big = f.counts[0] > 50
    assert big.sum() > npt * 0.8
    rel = np.abs(ours[big] / res.intensity[big] - 1)
    assert rel.max() < 1e-3, rel.max()
    # pixel counts agree but for pixels on a bin edge (pyFAI bins float32 positions)
    np.testing.assert_allclose(np.asarray(res.count)[big], f.counts[0][big], rtol=1e-3, atol=2)


def test_phi_matches_pyfai_chi_with_tilt():
    ai, _ = pyfai_for(CAM, (2500.0, -700.0), 70.0, 6.0, -4.0, 9.5, 1.0)
    f = make({"center": [2500.0, -700.0], "dis_to_sam": 70.0, "eBeam": 9.5, "tx": 6.0,
              "ty": -4.0}, CAM)
    chi = ai.center_array(unit="chi_rad", scale=False)
    diff = np.angle(np.exp(1j * (chi - f.phi_map)))
    assert np.abs(diff).max() < 1e-5


def test_poni_round_trip(tmp_path):
    center, dist, tx, ty = (1500.0, -800.0), 90.0, 4.0, -3.0
    ai, geo = pyfai_for(CAM, center, dist, tx, ty, 9.5, 1.0)
    ai.save(str(tmp_path / "geo.poni"))
    poni = read_poni(tmp_path / "geo.poni", WHERE)
    assert poni["dist"] == pytest.approx(geo["dist"]) and poni["pixel1"] == pytest.approx(50e-6)
    base = {"qbin": 0.02, "phiBins": 4, "Pplane": 1.0}
    a = make({"center": list(center), "dis_to_sam": dist, "eBeam": 9.5, "tx": tx, "ty": ty,
              **base}, CAM)
    b = make({"poni": str(tmp_path / "geo.poni"), **base}, CAM)
    assert b.wavelength_A == pytest.approx(a.wavelength_A, rel=1e-12)
    assert b.ebeam == pytest.approx(HC_PYFAI_KEV_A / a.wavelength_A, rel=1e-12)   # pyFAI's energy
    np.testing.assert_allclose(b.q_map, a.q_map, rtol=1e-9)
    np.testing.assert_allclose(b.correction, a.correction, rtol=1e-9)
    np.testing.assert_array_equal(b.pixel_bin, a.pixel_bin)
    frames = np.random.default_rng(4).uniform(0, 10, (2, *CAM.shape))
    np.testing.assert_allclose(run(b, frames), run(a, frames), rtol=1e-6)
    # a PONI whose pixel size is not the detector's is refused
    with pytest.raises(ConfigError, match=r"\.poni: .*pixel1 50 um .* 75 um"):
        make({"poni": str(tmp_path / "geo.poni")}, dataclasses.replace(CAM, pixel_size_um=75.0))
