"""azav against smalldata_tools' own rules: the expected values come from
``smalldata_reference`` / ``smalldata_cake`` below, which follow smalldata_tools
(github.com/slac-lcls/smalldata_tools) smalldata_tools/ana_funcs/azimuthalBinning.py,
``azimuthalBinning.__init__`` (defaults), ``_setup`` (maps and bins), ``doCake`` and
``process`` (per event) line by line, and smalldata_tools/utilities.py ``E2lam``."""
import dataclasses

import numpy as np
import pytest

from gpusmd import cuda
from gpusmd.backend import get_backend
from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.features.azimuthal import AzimuthalIntegration

BACKEND = get_backend()
WHERE = Where("test.yaml", "detectors.cam.functions[0]")
SMALL = get_detector("camera", (21, 31))


def smalldata_reference(model, good, center, dis_to_sam, eBeam=9.5, tx=0.0, ty=0.0,
                        Pplane=0, qbin=5e-3, phiBins=1, geomCorr=True, polCorr=True):
    """azimuthalBinning(...)._setup() on the model's pixels; ``good`` is 1 for used pixels
    (smalldata's ``_mask`` is its complement). Returns its arrays by smalldata's names."""
    x_um, y_um, z_um = (np.asarray(c, np.float64) for c in model.extra.get("coords_um")
                        or model.coords_um())
    _mask = ~(np.asarray(good).astype(bool)).flatten()
    x, y, z = x_um.flatten() / 1e3, y_um.flatten() / 1e3, z_um.flatten() / 1e3
    z_off = np.nanmean(z) - z
    xcen, ycen = center[0] / 1e3, center[1] / 1e3
    lam = (12398.4 / (eBeam * 1000.0 * 1.0)) * 1e-10 * 1e10       # util.E2lam(eBeam) * 1e10
    phiBins = list(phiBins) if isinstance(phiBins, (list, tuple)) else phiBins

    tx, ty = np.deg2rad(tx), np.deg2rad(ty)
    A, B, C = (-np.sin(ty) * np.cos(tx), -np.sin(tx), -np.cos(ty) * np.cos(tx))
    a, b, c = (xcen + (dis_to_sam + z_off) * np.tan(ty),
               float(ycen) - (dis_to_sam + z_off) * np.tan(tx), (dis_to_sam + z_off))
    r = np.sqrt((x - a) ** 2 + (y - b) ** 2 + c**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix_theta = np.arccos((A * (x - a) + B * (y - b) - C * c) / r)
        matrix_phi = np.arccos(
            ((A**2 + C**2) * (y - b) - A * B * (x - a) + B * C * c)
            / np.sqrt((A**2 + C**2) * (r**2 - (A * (x - a) + B * (y - b) - C * c) ** 2)))
    idx = (y >= ycen) & (np.isnan(matrix_phi))
    matrix_phi[idx] = 0
    idx = (y < ycen) & (np.isnan(matrix_phi))
    matrix_phi[idx] = np.pi
    idx = x < xcen
    matrix_phi[idx] = (np.pi - matrix_phi[idx]) + np.pi
    Pout = 1 - Pplane
    pol = Pout * (1 - (np.sin(matrix_phi) * np.sin(matrix_theta)) ** 2) + Pplane * (
        1 - (np.cos(matrix_phi) * np.sin(matrix_theta)) ** 2)

    if isinstance(phiBins, list):
        if max(phiBins) < (2 * np.pi - 0.01):
            phiBins.append(np.array(phiBins).max() + 0.001)
        if min(phiBins) > 0:
            phiBins.append(np.array(phiBins).min() - 0.001)
        phiBins.sort()
        nphi = len(phiBins)
        pbm = matrix_phi + (phiBins[1] - phiBins[0]) / 2
        pbm[pbm >= 2 * np.pi] -= 2 * np.pi
        phiVec = np.array(phiBins)
    else:
        nphi = phiBins
        phiint = (matrix_phi.max() - matrix_phi.min()) / phiBins
        pbm = matrix_phi + phiint / 2
        pbm[pbm >= 2 * np.pi] -= 2 * np.pi
        phiVec = np.linspace(matrix_phi.min(), matrix_phi.max() + np.spacing(np.min(pbm)),
                             phiBins + 1)
    idxphi = np.digitize(pbm.ravel(), phiVec) - 1
    idxphi[idxphi < 0] = 0
    idxphi[idxphi == nphi] = 0

    geom = (dis_to_sam + z_off) / r
    geom *= ((dis_to_sam + z_off) / r) ** 2
    if not geomCorr:
        geom = np.ones_like(geom).astype(float)
    if not polCorr:
        pol = np.ones_like(pol).astype(float)
    correction = geom * pol

    matrix_q = 4 * np.pi / lam * np.sin(matrix_theta / 2)
    q_max = np.nanmax(matrix_q[~_mask])
    q_min = np.nanmin(matrix_q[~_mask])
    qbin = np.array(qbin)
    if qbin.size == 1:
        qbins = np.arange(q_min - qbin, q_max + qbin, qbin)
    else:
        qbins = qbin
    q = (qbins[0:-1] + qbins[1:]) / 2
    nq = q.size
    idxq = np.digitize(matrix_q.ravel(), qbins) - 1
    idxq[_mask.ravel()] = 0
    Cake_idxs = np.ravel_multi_index((idxphi, idxq), (nphi, nq))
    Cake_idxs[_mask.ravel()] = 0
    Cake_Npixel = np.bincount(Cake_idxs, minlength=nq * nphi)
    Cake_norm = np.reshape(Cake_Npixel, (nphi, nq))
    return dict(matrix_theta=matrix_theta, matrix_phi=matrix_phi, matrix_q=matrix_q, pol=pol,
                geom=geom, qbins=qbins, q=q, nq=nq, nphi=nphi, phiVec=phiVec, pbm=pbm,
                idxq=idxq, idxphi=idxphi, lam=lam, Cake_norm=Cake_norm, _mask=_mask,
                correction=correction.flatten()[_mask.ravel() == 0],
                Cake_idxs=Cake_idxs[_mask.ravel() == 0])


def smalldata_cake(ref, data, thresADU=None, thresADUhigh=None):
    """azimuthalBinning.process + doCake for one frame."""
    data = data.copy()
    if thresADU is not None:
        data[data < thresADU] = 0.0
    if thresADUhigh is not None:
        data[data > thresADUhigh] = 0.0
    img = data.ravel()[ref["_mask"].ravel() == 0]
    nq, nphi = ref["nq"], ref["nphi"]
    I = np.bincount(ref["Cake_idxs"], weights=img / ref["correction"].ravel(),
                    minlength=nq * nphi)
    I = I[: nq * nphi]
    I = np.reshape(I, (nphi, nq))
    with np.errstate(invalid="ignore", divide="ignore"):
        return I / ref["Cake_norm"]


def make(params, model=SMALL, good=None):
    good = np.ones(model.shape, np.uint8) if good is None else good
    AzimuthalIntegration.check_params(params, WHERE)
    return AzimuthalIntegration("azav_0", params, model, {"cmask": good}, BACKEND, WHERE)


def run(feature, frames):
    out = feature.process(BACKEND.asarray(np.asarray(frames, np.float32)))
    return BACKEND.to_host(out["azav"])


def expected_bins(ref, good):
    """smalldata's (phi, q) bin of every used pixel, -1 for the others."""
    flat = np.ravel_multi_index((ref["idxphi"], ref["idxq"]), (ref["nphi"], ref["nq"]))
    return np.where(np.asarray(good).ravel() != 0, flat, -1)


def assert_same_setup(f, ref, good):
    """Maps and bins bit for bit, the q written per bin, the bin of every pixel."""
    np.testing.assert_array_equal(f.tth_map.ravel(), ref["matrix_theta"])
    np.testing.assert_array_equal(f.phi_map.ravel(), ref["matrix_phi"])
    np.testing.assert_array_equal(f.q_map.ravel(), ref["matrix_q"])
    np.testing.assert_array_equal(f.correction.ravel()[np.asarray(good).ravel() != 0],
                                  ref["correction"])
    np.testing.assert_array_equal(f.q_edges, ref["qbins"])
    np.testing.assert_array_equal(f.config_items()["q"], ref["q"])
    assert f.counts.shape == (ref["nphi"], ref["nq"])
    np.testing.assert_array_equal(f.pixel_bin.ravel(), expected_bins(ref, good))


CENTER, DIST = [100.0, -200.0], 50.0


# ---- 1. Pplane: smalldata's default 0 ------------------------------------------------
def test_default_pplane_is_smalldatas():
    cam = get_detector("camera", (256, 256))           # 12.8 mm square, 2theta up to 31 deg
    f = make({"center": [0.0, 0.0], "dis_to_sam": 15.0, "eBeam": 9.5}, cam)
    ref = smalldata_reference(cam, np.ones(cam.shape), [0.0, 0.0], 15.0)
    assert f.pplane == 0
    np.testing.assert_array_equal(f.correction.ravel(), ref["correction"])
    # Pplane 1 would weigh the pixels along x and along y the other way round
    one = make({"center": [0.0, 0.0], "dis_to_sam": 15.0, "eBeam": 9.5, "Pplane": 1}, cam)
    ratio = one.correction / f.correction
    assert ratio.min() < 0.9 and ratio.max() > 1.1


# ---- 2. h c = 12398.4 eV A (E2lam) ------------------------------------------------------
def test_wavelength_is_smalldatas_E2lam_and_decides_edge_pixels():
    f = make({"center": CENTER, "dis_to_sam": DIST, "eBeam": 9.5})
    assert f.wavelength_A == (12398.4 / (9.5 * 1000.0)) * 1e-10 * 1e10
    # an edge between a pixel's q with h c = 12398.4 and with CODATA's 12398.4198: the
    # pixel is in the bin smalldata puts it in (above the edge)
    k = np.unravel_index(np.argmax(f.q_map), SMALL.shape)
    q_sd = f.q_map[k]
    q_codata = q_sd * 12398.4 / 12398.419843320026
    edge = (q_sd + q_codata) / 2
    assert q_codata < edge < q_sd
    g = make({"center": CENTER, "dis_to_sam": DIST, "eBeam": 9.5,
              "qbin": [0.0, float(edge), 2 * float(q_sd)]})
    assert g.pixel_bin[k] == 1
    ref = smalldata_reference(SMALL, np.ones(SMALL.shape), CENTER, DIST,
                              qbin=[0.0, float(edge), 2 * float(q_sd)])
    assert_same_setup(g, ref, np.ones(SMALL.shape))


# ---- 3. phi bins centred on the phi range the detector covers ----------------------------
@pytest.mark.parametrize("center, nphi", [
    ([0.0, 0.0], 4),                 # the beam on the detector: phi over [0, 2 pi)
    ([-2000.0, -3000.0], 3),          # beyond a corner: phi over a quarter or so
    ([100.0, -200.0], 5),
])
def test_phi_bins_are_smalldatas(center, nphi):
    f = make({"center": center, "dis_to_sam": DIST, "phiBins": nphi})
    good = np.ones(SMALL.shape)
    ref = smalldata_reference(SMALL, good, center, DIST, phiBins=nphi)
    assert_same_setup(f, ref, good)
    # by hand: n bins as wide as the covered range / n, bin k centred on min + k width,
    # the last half bin in bin 0
    phi = f.phi_map
    width = (phi.max() - phi.min()) / nphi
    k = np.floor((phi - phi.min() + width / 2) / width).astype(int)
    k[k >= nphi] = 0
    near_edge = np.abs(np.mod(phi - phi.min() + width / 2 + 1e-9, width)) < 1e-8
    assert np.array_equal((f.pixel_bin // f.nq)[~near_edge], k[~near_edge])
    np.testing.assert_allclose(f.config_items()["phi"], np.degrees(ref["phiVec"][:-1]),
                               atol=1e-9)
    last_half = phi >= phi.min() + (nphi - 0.5) * width + 1e-8
    assert last_half.sum() > 0 and np.all(f.pixel_bin[last_half] // f.nq == 0)
    if center == [-2000.0, -3000.0]:
        assert phi.max() - phi.min() < np.pi / 2


# ---- 4. q: arange(qmin - qbin, qmax + qbin, qbin), first bin empty ----------------------
@pytest.mark.parametrize("qbin", [0.005, 0.01, 0.0123])
def test_q_bins_are_smalldatas(qbin):
    good = np.ones(SMALL.shape, np.uint8)
    good[2:5, 7:9] = 0
    f = make({"center": CENTER, "dis_to_sam": DIST, "qbin": qbin}, good=good)
    ref = smalldata_reference(SMALL, good, CENTER, DIST, qbin=qbin)
    assert_same_setup(f, ref, good)
    qg = f.q_map[good != 0]
    assert f.q_edges[0] == qg.min() - qbin
    assert f.counts[:, 0].sum() <= 1 and f.counts[:, 1].sum() > 0   # the lowest q only
    if qbin == 0.005:                      # the default
        g = make({"center": CENTER, "dis_to_sam": DIST}, good=good)
        np.testing.assert_array_equal(g.q_edges, f.q_edges)


# ---- 5. qbin as edges, phiBins as a list (rad) --------------------------------------------
@pytest.mark.parametrize("phi_bins", [
    [0.0, np.pi / 2, np.pi, 3 * np.pi / 2, 2 * np.pi],      # nothing added
    [1.0, 2.0, 3.0],                  # min - 0.001 and max + 0.001 added
    [0.0, 2.5],                       # max + 0.001 added
])
def test_edges_lists_are_smalldatas(phi_bins):
    qbins = [0.0, 0.004, 0.01, 0.02, 0.05, 0.3]      # all pixels inside, as smalldata needs
    params = {"center": CENTER, "dis_to_sam": DIST, "qbin": qbins, "phiBins": phi_bins}
    f = make(params)
    good = np.ones(SMALL.shape)
    ref = smalldata_reference(SMALL, good, CENTER, DIST, qbin=qbins, phiBins=phi_bins)
    assert_same_setup(f, ref, good)
    assert f.nphi == ref["nphi"] == len(ref["phiVec"])
    # the same edges given as qedges
    g = make({**{k: v for k, v in params.items() if k != "qbin"}, "qedges": qbins})
    np.testing.assert_array_equal(g.pixel_bin, f.pixel_bin)
    # pixels beyond the edges count nowhere (smalldata raises)
    h = make({**params, "qbin": qbins[:-1]})
    beyond = f.q_map >= 0.05
    assert beyond.sum() > 0 and np.all(h.pixel_bin[beyond] == -1)
    np.testing.assert_array_equal(h.pixel_bin[~beyond], f.pixel_bin[~beyond] // f.nq * h.nq
                                  + f.pixel_bin[~beyond] % f.nq)


# ---- 6. eBeam: smalldata's default 9.5 keV ---------------------------------------------------
def test_default_ebeam_is_smalldatas():
    f = make({"center": CENTER, "dis_to_sam": DIST})
    g = make({"center": CENTER, "dis_to_sam": DIST, "eBeam": 9.5})
    assert f.ebeam == 9.5 and f.config_items()["eBeam"] == 9.5
    np.testing.assert_array_equal(f.q_map, g.q_map)


# ---- a simulated frame: tilt, z steps, mask, thresholds -------------------------------------
def test_simulated_frames_give_smalldatas_azav():
    base = get_detector("camera", (96, 120))
    x, y, _ = base.coords_um()
    z = np.where(y > 0, 250.0, -150.0) + 0.5 * x     # two tiles at different z, tilted
    model = dataclasses.replace(base, extra={"coords_um": (x, y, z)})
    good = (np.random.default_rng(5).random(model.shape) > 0.1).astype(np.uint8)
    good[40:44, :] = 0
    setup = dict(center=[300.0, 900.0], dis_to_sam=45.0, eBeam=8.0, tx=1.0, ty=-1.5,
                 Pplane=0.3, qbin=0.01, phiBins=6)
    f = make({**setup, "thresADU": [5.0, 900.0]}, model, good)
    ref = smalldata_reference(model, good, **setup)
    assert_same_setup(f, ref, good)
    # rings in q over a flat background, corrected like a real pattern, with noise
    rng = np.random.default_rng(6)
    q = f.q_map
    ideal = (200 + 150 * np.cos(q * 90) ** 2) * f.correction
    frames = rng.poisson(ideal, (3, *model.shape)).astype(np.float32)
    frames[:, 10, 10] = 2000.0               # above thresADU high
    frames[:, 11, 11] = 1.0                  # below thresADU low
    ours = run(f, frames)
    for e in range(len(frames)):
        theirs = smalldata_cake(ref, frames[e], thresADU=5.0, thresADUhigh=900.0)
        # smalldata counts its masked pixels in bin (0, 0): the one difference
        np.testing.assert_allclose(ours[e].ravel()[1:], theirs.ravel()[1:], rtol=2e-7,
                                   atol=0, equal_nan=True)
        assert np.isnan(ours[e, 0, 0]) and theirs[0, 0] == 0.0
    assert np.isfinite(ours).sum() > 0.5 * ours.size
    # the GPU kernels (host build), for any launch: the same numbers, bit for bit
    ok = f.pixel_bin >= 0
    inv = np.where(ok, 1.0 / np.where(ok, f.correction, 1.0), 0.0).astype(np.float32)
    plan = cuda.hist_plan(f.pixel_bin, inv, f.nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_counts = np.where(f.counts > 0, 1.0 / f.counts, np.nan).ravel()
    for blocks in (1, 6):
        sums = cuda.histogram_host(frames, plan, 5.0, 900.0, blocks=blocks)
        np.testing.assert_array_equal((sums * inv_counts).astype(np.float32),
                                      ours.reshape(len(frames), -1))
