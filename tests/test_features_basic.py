"""projection, spectrum, image / lineout, autocorr on hand-built frames."""
import dataclasses

import numpy as np
import pytest

from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features import FEATURES
from gpusmd.features.autocorr import Autocorrelation
from gpusmd.features.image import Image, Lineout
from gpusmd.features.projection import Projection
from gpusmd.features.spectrum import Spectrum
from gpusmd.geometry import assemble

from conftest import backend_or_skip

BACKEND = backend_or_skip()       # GPUSMD_BACKEND=gpu runs these on the device
CAM = get_detector("camera", (6, 5))
QUAD = get_detector("epix10kquad")
WHERE = Where("test.yaml", "f")


def make(cls, params, model=CAM, mask=None, input_shape=None, masks=None):
    cls.check_params(params, WHERE)
    if masks is None:
        masks = {"cmask": np.ones(model.shape, np.uint8) if mask is None else mask}
    return cls("x", params, model, masks, BACKEND, WHERE, input_shape=input_shape)


def run(feature, f):
    out = feature.process(BACKEND.asarray(np.asarray(f, np.float32)))
    return {k: BACKEND.to_host(v) for k, v in out.items()}


def test_kinds_registered_with_smalldata_names():
    for kind in ("projection", "spectrum", "image", "lineout", "autocorr"):
        assert kind in FEATURES
    assert Projection.default_name_for({"axis": 1}, 0) == "pj_ax_1"
    assert Projection.default_name_for({"axis": -1}, 3) == "pj_ax_1"
    assert Spectrum.default_name_for({"bins": [0, 1, 2]}, 0) == "spectrum"
    assert Autocorrelation.default_name_for({}, 0) == "autocorr"
    assert Image.default_name_for({"rebin": 2}, 0) == "img_rebin2"
    assert Lineout.default_name_for({"axis": 0}, 0) == "lineout_ax_0"


# ---- projection -------------------------------------------------------------------------
def frames(nb=3, shape=(6, 5), seed=1):
    return np.random.default_rng(seed).uniform(-2, 10, (nb, *shape)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1])
def test_projection_sum(axis):
    f = frames()
    out = run(make(Projection, {"axis": axis}), f)
    np.testing.assert_allclose(out["data"], f.sum(axis=axis + 1), rtol=1e-5)
    assert out["data"].dtype == np.float32


@pytest.mark.parametrize("params", [{}, {"axis": -1}, {"axis": -2}])
def test_projection_on_a_negative_axis_is_one_number(params):
    """smalldata_tools ana_funcs/roi_rebin.py projectionFunc.process: axis < 0 (its default
    -1) gives np.nansum (or np.nanmean) of the whole input."""
    f = frames()
    mask = np.ones(CAM.shape, np.uint8)
    mask[2, 1] = 0
    out = run(make(Projection, params, mask=mask), f)
    np.testing.assert_allclose(out["data"], (f * mask).sum(axis=(1, 2)), rtol=1e-5)
    assert out["data"].shape == (3,)
    out = run(make(Projection, {**params, "mean": True}, mask=mask), f)
    np.testing.assert_allclose(out["data"], (f * mask).sum(axis=(1, 2)) / 29, rtol=1e-5)


def test_projection_threshold_in_noise_units():
    """smalldata_tools projectionFunc: array.data[array.data < thresRms * rms] = 0."""
    f = frames()
    rms = np.random.default_rng(3).uniform(0.5, 2, CAM.shape).astype(np.float32)
    params = {"axis": 0, "thresRms": 2.5}
    Projection.check_params(params, WHERE)
    pj = Projection("x", params, CAM, {"cmask": np.ones(CAM.shape, np.uint8)}, BACKEND, WHERE,
                    rms=rms)
    np.testing.assert_allclose(run(pj, f)["data"], np.where(f < 2.5 * rms, 0, f).sum(axis=1),
                               rtol=1e-5)
    with pytest.raises(ConfigError, match=r"f\.thresRms: .*noise"):
        make(Projection, params)


def test_projection_mean_excludes_masked_pixels():
    f = frames()
    mask = np.ones(CAM.shape, np.uint8)
    mask[2, 1] = mask[4, 1] = 0
    mask[:, 3] = 0                                   # a whole column: its mean is NaN
    out = run(make(Projection, {"axis": 0, "mean": True}, mask=mask), f)
    m = mask.astype(bool)
    with np.errstate(invalid="ignore"):
        expect = (f * m).sum(axis=1) / m.sum(axis=0)
    expect[:, 3] = np.nan
    np.testing.assert_allclose(out["data"], expect, rtol=1e-5)
    assert np.isnan(out["data"][:, 3]).all()
    out = run(make(Projection, {"axis": 1}, mask=mask), f)
    np.testing.assert_allclose(out["data"], (f * m).sum(axis=2), rtol=1e-5)


def test_projection_thresholds_and_single_photon():
    f = np.zeros((1, 6, 5), np.float32)
    f[0, 1, :] = [0.5, 3, 7, 20, -1]
    f[0, 2, :] = [4, 4, 4, 4, 4]
    before = f.copy()
    out = run(make(Projection, {"axis": 0, "thresADU": 2}), f)
    np.testing.assert_allclose(out["data"][0], [4, 7, 11, 24, 4])
    out = run(make(Projection, {"axis": 1, "thresADU": [2, 10]}), f)
    np.testing.assert_allclose(out["data"][0, :3], [0, 10, 20])
    out = run(make(Projection, {"axis": 1, "thresADU": [2, 10], "singlePhoton": True}), f)
    np.testing.assert_allclose(out["data"][0, :3], [0, 2, 5])
    out = run(make(Projection, {"axis": 0, "singlePhoton": True, "mean": True}), f)
    np.testing.assert_allclose(out["data"][0], np.array([2, 2, 2, 2, 1]) / 6, rtol=1e-6)
    np.testing.assert_array_equal(f, before)


def test_projection_of_segmented_input():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2, *QUAD.shape)).astype(np.float32)
    for axis, expect_shape in ((0, (352, 384)), (1, (4, 384)), (2, (4, 352))):
        pj = make(Projection, {"axis": axis}, model=QUAD)
        out = run(pj, f)
        assert out["data"].shape == (2, *expect_shape) and pj.output_shape == expect_shape
        np.testing.assert_allclose(out["data"], f.sum(axis=axis + 1), rtol=1e-4, atol=1e-3)


def test_projection_chained_input_takes_no_mask():
    f = frames(shape=(4, 3))
    out = run(make(Projection, {"axis": 1, "mean": True}, input_shape=(4, 3)), f)
    np.testing.assert_allclose(out["data"], f.mean(axis=2), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"f\.mask"):
        make(Projection, {"axis": 1, "mask": "cmask"}, input_shape=(4, 3))


def test_projection_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"f\.axis"):
        Projection.check_params({"axis": "x"}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.mean"):
        Projection.check_params({"axis": 0, "mean": "yes"}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.thresADU"):
        Projection.check_params({"axis": 0, "thresADU": [5, 1]}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.bogus"):
        Projection.check_params({"axis": 0, "bogus": 1}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.axis: axis 2"):
        make(Projection, {"axis": 2})
    with pytest.raises(ConfigError, match=r"f\.mask: unknown mask"):
        make(Projection, {"axis": 0, "mask": "nope"})


# ---- spectrum ------------------------------------------------------------------------------
SPEC_VALUES = np.array([[-1, 0, 0.5, 1, 1.5, 2, 2.5, 3.9, 4, 5, 7, 9],
                        [0, 0, 0, 3, 3, 3, 3, 3, 3, np.nan, 4, 2]], np.float32).reshape(2, 3, 4)


@pytest.mark.parametrize("params, edges", [
    ({"bins": [0, 4, 4]}, [0, 1, 2, 3, 4]),
    ({"bins": [0, 4, 1.0]}, [0, 1, 2, 3, 4]),
    ({"bins": [0, 3.5, 1.0]}, [0, 1, 2, 3, 4]),              # last edge past hi
    ({"bins": [0, 1, 2.5, 4]}, [0, 1, 2.5, 4]),
    ({"edges": [0, 2, 4]}, [0, 2, 4]),
])
def test_spectrum_bins_forms(params, edges):
    model = get_detector("camera", (3, 4))
    sp = make(Spectrum, params, model=model)
    np.testing.assert_allclose(sp.edges, edges)
    out = run(sp, SPEC_VALUES)
    expect = [np.histogram(v[np.isfinite(v)], np.asarray(edges, float))[0]
              for v in SPEC_VALUES.reshape(2, -1)]
    np.testing.assert_array_equal(out["histogram"], expect)
    assert out["histogram"].dtype == np.int32
    np.testing.assert_allclose(sp.config_items()["edges"], edges)


def test_spectrum_mask_and_segmented_input():
    rng = np.random.default_rng(3)
    f = rng.normal(5, 3, (2, *QUAD.shape)).astype(np.float32)
    mask = (rng.random(QUAD.shape) > 0.1).astype(np.uint8)
    out = run(make(Spectrum, {"bins": [0, 10, 20]}, model=QUAD, mask=mask), f)
    edges = np.linspace(0, 10, 21)
    for b in range(2):
        np.testing.assert_array_equal(out["histogram"][b],
                                      np.histogram(f[b][mask != 0], edges)[0])


@pytest.mark.parametrize("bins", [[-3, 7, 37], [-3, 7, 0.1], [-3, 2.5, 4, 7.5]])
def test_spectrum_equals_numpy_histogram_on_edges_and_noise(bins):
    model = get_detector("camera", (40, 50))
    sp = make(Spectrum, {"bins": bins}, model=model)
    rng = np.random.default_rng(7)
    f = rng.normal(2, 3, (3, 40, 50)).astype(np.float32)
    n = sp.edges.size
    f[0].reshape(-1)[:n] = sp.edges                    # values (nearly) on the edges
    f[1].reshape(-1)[:n] = np.nextafter(sp.edges.astype(np.float32), -np.inf)
    f[2, 0, :3] = [np.inf, -np.inf, np.nan]
    out = run(sp, f)
    xp = BACKEND.xp
    vectorised = BACKEND.to_host(sp.counts_array(xp, xp.asarray(f.reshape(3, -1))))
    for b in range(3):
        v = f[b].ravel().astype(np.float64)
        expect = np.histogram(v[np.isfinite(v)], sp.edges)[0]
        np.testing.assert_array_equal(out["histogram"][b], expect)
        np.testing.assert_array_equal(vectorised[b], expect)    # the GPU path, on any backend


def test_spectrum_config_errors_name_the_key():
    for params, key in (({"bins": [0, 4]}, "bins"), ({"bins": [4, 0, 4]}, "bins"),
                        ({"bins": [0, 4, 0]}, r"bins\[2\]"), ({"bins": [0, 4, -1.0]}, r"bins\[2\]"),
                        ({"bins": [0, 2, 1, 3]}, "bins"), ({"edges": [1]}, "edges"),
                        ({"bins": [0, "a", 3]}, r"bins\[1\]")):
        with pytest.raises(ConfigError, match=rf"f\.{key}"):
            Spectrum.check_params(params, WHERE)
    with pytest.raises(ConfigError, match="bins"):
        Spectrum.check_params({}, WHERE)


# ---- image / lineout --------------------------------------------------------------------------
def test_camera_image_is_the_frame_and_rebins():
    cam = get_detector("camera", (7, 9))
    f = frames(2, (7, 9))
    out = run(make(Image, {}, model=cam), f)
    np.testing.assert_allclose(out["img"], f)
    im = make(Image, {"rebin": 3}, model=cam)
    out = run(im, f)
    assert out["img"].shape == (2, 3, 3) and im.output_shape == (3, 3)
    padded = np.zeros((2, 9, 9), np.float32)
    padded[:, :7] = f                                  # partial bottom blocks kept
    expect = padded.reshape(2, 3, 3, 3, 3).sum(axis=(2, 4))
    np.testing.assert_allclose(out["img"], expect, rtol=1e-5)


def test_segmented_image_matches_geometry_assemble():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(2, *QUAD.shape)).astype(np.float32)
    out = run(make(Image, {}, model=QUAD), f)
    x, y, _ = QUAD.coords_um()
    for b in range(2):
        np.testing.assert_array_equal(out["img"][b], assemble(f[b], x, y, QUAD.pixel_size_um,
                                                              fill=0))
    # 2 x 2 segments with 10-pixel gaps
    assert out["img"].shape == (2, 2 * 352 + 10, 2 * 384 + 10)
    assert out["img"][0, 0, 0] == f[0, 0, 0, 0] and out["img"][0, 362, 394] == f[0, 3, 0, 0]
    # masked pixels count as 0; rebin of the assembled image
    mask = np.ones(QUAD.shape, np.uint8)
    mask[1, 5, 6] = 0
    out2 = run(make(Image, {"mask": "cmask", "rebin": 2}, model=QUAD, mask=mask), f)
    img = out["img"].copy()
    img[:, 5, 394 + 6] = 0
    np.testing.assert_allclose(out2["img"], img.reshape(2, 357, 2, 389, 2).sum(axis=(2, 4)),
                               rtol=1e-5, atol=1e-5)


def test_image_with_overlapping_pixels_sums_them():
    cam = get_detector("camera", (4, 4))
    x, y, _ = cam.coords_um()
    y = y.copy()
    y[:, 3] = y[:, 2]                      # columns 2 and 3 land on the same image pixel
    model = dataclasses.replace(cam, extra={"coords_um": (x, y)})
    f = frames(2, (4, 4))
    out = run(make(Image, {}, model=model), f)
    expect = f[:, :, :3].copy()
    expect[:, :, 2] += f[:, :, 3]
    np.testing.assert_allclose(out["img"], expect, rtol=1e-5)


def test_lineout():
    cam = get_detector("camera", (7, 9))
    f = frames(2, (7, 9))
    out = run(make(Lineout, {"axis": 0, "band": [2, 5]}, model=cam), f)
    np.testing.assert_allclose(out["data"], f[:, 2:5, :].sum(axis=1), rtol=1e-5)
    out = run(make(Lineout, {"axis": 1}, model=cam), f)
    np.testing.assert_allclose(out["data"], f.sum(axis=2), rtol=1e-5)
    lo = make(Lineout, {"axis": 1, "band": [0, 2], "rebin": 2}, model=cam)
    out = run(lo, f)
    assert lo.output_shape == (4,)
    np.testing.assert_allclose(out["data"][:, :3], f[:, :6, :4].reshape(2, 3, 2, 4).sum((2, 3)),
                               rtol=1e-5)
    with pytest.raises(ConfigError, match=r"f\.band"):
        make(Lineout, {"axis": 0, "band": [2, 8]}, model=cam)
    with pytest.raises(ConfigError, match=r"f\.axis"):
        Lineout.check_params({"axis": 2}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.rebin"):
        Image.check_params({"rebin": 0}, WHERE)
    with pytest.raises(ConfigError, match="2-D input"):
        make(Image, {}, model=QUAD, input_shape=(2, 3, 4))


# ---- autocorrelation ---------------------------------------------------------------------
def speckles(nb, n, s, seed=0):
    """Fully developed speckle: |FFT of a random-phase field under a Gaussian pupil|^2.

    The pupil |A(f)|^2 = exp(-f^2 / s^2) (f in frequency pixels of an n-grid) makes
    g2(d) - 1 = exp(-2 pi^2 s^2 d^2 / n^2): half maximum at d = n sqrt(ln 2 / 2) / (pi s)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n) * n
    pupil = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) / (2 * s ** 2))
    phase = np.exp(2j * np.pi * rng.random((nb, n, n)))
    field = np.fft.ifft2(pupil * phase)
    return (np.abs(field) ** 2 / np.mean(np.abs(field) ** 2) * 100).astype(np.float32)


def brute_g2(img, mask, d0, d1):
    a, m = img * mask, mask.astype(float)
    n0, n1 = img.shape
    r0, r1 = slice(max(0, -d0), min(n0, n0 - d0)), slice(max(0, -d1), min(n1, n1 - d1))
    s0, s1 = slice(r0.start + d0, r0.stop + d0), slice(r1.start + d1, r1.stop + d1)
    return ((a[r0, r1] * a[s0, s1]).sum() * (m[r0, r1] * m[s0, s1]).sum()
            / ((a[r0, r1] * m[s0, s1]).sum() * (m[r0, r1] * a[s0, s1]).sum()))


def test_autocorr_matches_direct_sums_with_mask_and_roi():
    rng = np.random.default_rng(5)
    cam = get_detector("camera", (14, 12))
    f = rng.uniform(0, 5, (2, 14, 12)).astype(np.float32)
    mask = (rng.random(cam.shape) > 0.2).astype(np.uint8)
    ac = make(Autocorrelation, {"roi": [[2, 12], [1, 10]], "save_range": [3, 4]},
              model=cam, mask=mask)
    out = run(ac, f)
    assert out["autocorr"].shape == (2, 7, 9)
    sub, m = f[:, 2:12, 1:10], mask[2:12, 1:10]
    for b in range(2):
        expect = [[brute_g2(sub[b].astype(float), m, d0, d1) for d1 in range(-4, 5)]
                  for d0 in range(-3, 4)]
        np.testing.assert_allclose(out["autocorr"][b], expect, rtol=2e-4)
        np.testing.assert_allclose(out["cr"][b], sub[b][m != 0].mean(), rtol=1e-5)


def test_autocorr_of_speckle_gives_contrast_and_speckle_size():
    n, s = 256, 8.0
    cam = get_detector("camera", (n, n))
    f = speckles(4, n, s)
    mask = np.ones(cam.shape, np.uint8)
    mask[100:110, :] = 0                               # a dead band: must not bias g2
    out = run(make(Autocorrelation, {"save_range": [20, 20]}, model=cam, mask=mask), f)
    g2 = out["autocorr"]
    assert g2.shape == (4, 41, 41)
    np.testing.assert_allclose(g2[:, 20, 20], 2.0, rtol=0.1)        # 1 + contrast^2
    np.testing.assert_allclose(out["cr"], [im[mask != 0].mean() for im in f], rtol=1e-5)
    mean = g2.mean(axis=0) - 1
    expect_half = n * np.sqrt(np.log(2) / 2) / (np.pi * s)       # 5.99 px
    for profile in (mean[20, 20:], mean[20:, 20]):
        profile = profile / profile[0]
        k = np.argmax(profile < 0.5)                                # first lag below half
        half = k - 1 + (profile[k - 1] - 0.5) / (profile[k - 1] - profile[k])
        assert abs(half - expect_half) < 0.15 * expect_half, (half, expect_half)
    np.testing.assert_allclose(mean[20, 20 + 18:], 0, atol=0.05)     # decorrelated far out


def test_autocorr_segmented_and_errors():
    rng = np.random.default_rng(6)
    f = rng.uniform(1, 2, (1, *QUAD.shape)).astype(np.float32)
    out = run(make(Autocorrelation, {"roi": [[2, 3], [0, 40], [0, 30]], "save_range": [5, 5]},
                   model=QUAD), f)
    assert out["autocorr"].shape == (1, 11, 11)
    np.testing.assert_allclose(out["cr"], f[0, 2, :40, :30].mean(), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"f\.roi"):
        make(Autocorrelation, {"roi": [[0, 2], [0, 40], [0, 30]]}, model=QUAD)
    with pytest.raises(ConfigError, match=r"f\.roi: required"):
        make(Autocorrelation, {}, model=QUAD)
    with pytest.raises(ConfigError, match=r"f\.save_range"):
        make(Autocorrelation, {"save_range": [6, 2]})
    with pytest.raises(ConfigError, match=r"f\.save_range"):
        Autocorrelation.check_params({"save_range": [1]}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.roi\[0\]"):
        Autocorrelation.check_params({"roi": [[0, "a"]]}, WHERE)
    with pytest.raises(ConfigError, match=r"f\.thresADU"):
        Autocorrelation.check_params({"thresADU": "x"}, WHERE)


# ---- the projection kernel (host build of kernels/projection.cu) ----------------------------
@pytest.fixture(scope="module")
def _private_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GPUSMD_CACHE", str(tmp_path_factory.getbasetemp() / "gpusmd-cache"))
    yield
    mp.undo()


def _host_compiler():
    import shutil
    return shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(not _host_compiler(), reason="no C++ compiler for the host build")
@pytest.mark.parametrize("params", [
    {"axis": 0}, {"axis": 1, "mean": True}, {"axis": 2, "thresADU": [0.5, 2]},
    {"axis": 2, "thresADU": 1, "singlePhoton": True, "mean": True}, {"axis": 1, "singlePhoton": True},
])
def test_projection_kernel_host_build_matches_feature(params, _private_cache):
    from gpusmd import cuda
    model = get_detector("cspad")                        # (32, 185, 388)
    seg = (3, 37, 45)                                    # a small 3-D input, odd sizes
    rng = np.random.default_rng(8)
    f = rng.normal(1, 1.5, (2, *seg)).astype(np.float32)
    mask = (rng.random(seg) > 0.2).astype(np.uint8)
    mask[:, :, 4] = 0                                    # a column with no good pixel
    small = dataclasses.replace(model, shape=seg)
    pj = make(Projection, params, model=small, mask=mask)
    expect = run(pj, f)["data"]
    for blocks in (None, 3):                             # short grid: the stride loop wraps
        got = cuda.project_host(f, pj.axis, mask=mask, inv_count=BACKEND.to_host(pj.inv_count),
                                lo=pj.lo, hi=pj.hi, single_photon=pj.single_photon,
                                mean=pj.mean, blocks=blocks)
        assert got.shape == expect.shape
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5, equal_nan=True)
    got = cuda.project_host(f, pj.axis, lo=pj.lo, hi=pj.hi, single_photon=pj.single_photon)
    chained = make(Projection, {k: v for k, v in params.items() if k != "mean"},
                   input_shape=seg)                       # no mask
    np.testing.assert_allclose(got, run(chained, f)["data"], rtol=1e-5, atol=1e-5)
