"""Calibration on hand-built raw values (DESIGN §5): every gain range, invalid bits, masks.

The rules are psana2's: psana/detector/UtilsEpix10ka.py calib_epix10ka_any (no offset;
a pixel in no gain range keeps its raw ADU x mask: the np.select defaults of
event_constants_for_gmaps, pedestal 0 and factor 1) and UtilsJungfrau.py
calib_jungfrau_single_panel (pedestal + pixel_offset; gain bits 2 give 0)."""
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.calibrate import FAMILY_EPIX10K, Calibrator, build_lut, lut_rows
from gpusmd.calib.constants import Constants
from gpusmd.calib.masks import pixel_masks
from gpusmd.detectors import EPIX10K_DEFAULT_GAIN, JUNGFRAU_DEFAULT_GAIN, epix10k_control_bits, get_detector

CPU = get_backend("cpu")


def constants_with_levels(model):
    """Pedestal 1000 + 100 g and offset g in gain range g, nominal gains."""
    c = Constants.default(model)
    for g in range(model.ngain):
        c.pedestal[g] = 1000 + 100 * g
        c.offset[g] = g
    return c


def calibrate_pixels(model, consts, raw_values, pixels, control_bits=None, mask=None):
    """Put raw_values at the given flat pixel indices of one frame and calibrate it."""
    raw = np.zeros((1, model.npix), model.dtype)
    raw[0, pixels] = raw_values
    mask = np.ones(model.shape, np.uint8) if mask is None else mask
    cal = Calibrator(model, consts, mask, CPU)
    if control_bits is not None:
        cal.set_control_bits(0, control_bits)
    return cal(raw.reshape(1, *model.shape)).reshape(-1)[pixels]


def test_epix10k_every_gain_range():
    """psana calib_epix10ka_any: (raw & 0x3fff - pedestal) / gain x mask; the offsets
    (here g in range g) are not subtracted."""
    model = get_detector("epix10kquad")
    consts = constants_with_levels(model)
    # (control bits, raw bit 14) -> expected gain range
    cases = [(28, 0, 0), (28, 1, 0), (12, 0, 1), (8, 0, 2), (24, 0, 2), (16, 0, 3), (0, 0, 4),
             (16, 1, 5), (0, 1, 6)]
    pixels = 5000 + np.arange(len(cases))
    cb = np.zeros(model.npix, np.uint8)
    cb[pixels] = [c[0] for c in cases]
    raw = np.array([2000 | (b14 << 14) for _, b14, _ in cases], np.uint16)
    out = calibrate_pixels(model, consts, raw, pixels, control_bits=cb)
    for (cbits, b14, g), value in zip(cases, out):
        expected = np.float32(2000 - (1000 + 100 * g)) * np.float32(1 / EPIX10K_DEFAULT_GAIN[g])
        assert value == expected, (cbits, b14, g)


def test_epix10k_undefined_configuration_gives_raw_adu_times_mask():
    """g set without ga (control bits 4, with or without trbit and raw bit 14) names no
    gain range in psana's gain_maps_epix10ka_any_alg: calib_epix10ka_any gives the raw
    ADU (raw & 0x3fff, pedestal 0, factor 1) x mask, whatever the pedestals, gains and
    offsets of the pixel; a masked one gives 0."""
    model = get_detector("epix10kquad")
    consts = constants_with_levels(model)
    pixels = 7000 + np.arange(5)
    cb = np.zeros(model.npix, np.uint8)
    cb[pixels] = [4, 4, 20, 20, 4]
    raw = np.array([2000, 2000 | 0x4000, 123, 0x4000 | 0x3fff, 2000], np.uint16)
    mask = np.ones(model.npix, np.uint8)
    mask[pixels[-1]] = 0
    out = calibrate_pixels(model, consts, raw, pixels, control_bits=cb,
                           mask=mask.reshape(model.shape))
    np.testing.assert_array_equal(out, [2000, 2000, 123, 0x3fff, 0])
    from gpusmd import cuda                      # the kernel, through the host build
    frame = np.zeros((1, model.npix), np.uint16)
    frame[0, pixels] = raw
    lut = build_lut(consts, mask.reshape(model.shape))
    got = cuda.calibrate_host(frame, cb, lut, FAMILY_EPIX10K)[0, pixels]
    np.testing.assert_array_equal(got, [2000, 2000, 123, 0x3fff, 0])
    for convention in ("multiply", "none"):      # no gain whatever the convention
        cal = Calibrator(model, consts, mask.reshape(model.shape), CPU, convention)
        lut = cal.host_lut
        assert lut.shape == (8, model.npix, 2)
        np.testing.assert_array_equal(lut[7, pixels], [[0, 1]] * 4 + [[0, 0]])


def test_offsets_only_for_the_jungfrau():
    """psana adds pixel_offset to the pedestals only in calib_jungfrau; its epix10ka and
    single-gain calibrations (calib_epix10ka_any, AreaDetectorRaw.calib) have none."""
    for t in ("epix10kquad", "epix100", "cspad"):
        model = get_detector(t)
        c = constants_with_levels(model)
        c.offset[:] = 7
        lut = build_lut(c, np.ones(model.shape, np.uint8))
        np.testing.assert_array_equal(lut[:model.ngain, :, 0],
                                      c.pedestal.reshape(model.ngain, -1), err_msg=t)
    model = get_detector("jungfrau05M")
    c = constants_with_levels(model)
    lut = build_lut(c, np.ones(model.shape, np.uint8))
    np.testing.assert_array_equal(lut[..., 0], (c.pedestal + c.offset).reshape(3, -1))


def test_epix10k_control_bits_take_trbit_per_asic():
    pixel_config = np.zeros((1, 352, 384), np.uint8)
    pixel_config[0, 0, 0] = 12           # g and ga
    trbit = np.array([[1, 0, 0, 1]])     # ASIC a = 2 * (row // 176) + col // 192
    cb = epix10k_control_bits(pixel_config, trbit)
    assert cb[0, 0, 0] == 28 and cb[0, 0, 200] == 0
    assert cb[0, 200, 0] == 0 and cb[0, 200, 200] == 16


def test_jungfrau_gains_and_invalid_bits():
    model = get_detector("jungfrau05M")
    consts = constants_with_levels(model)
    pixels = np.array([3000, 3001, 3002, 3003])
    raw = np.array([(0 << 14) | 1500, (1 << 14) | 1500, (3 << 14) | 1500, (2 << 14) | 1500],
                   np.uint16)
    out = calibrate_pixels(model, consts, raw, pixels)
    for g in range(3):
        expected = (1500 - (1000 + 100 * g) - g) / JUNGFRAU_DEFAULT_GAIN[g]
        assert out[g] == pytest.approx(expected, rel=1e-6)
    assert out[3] == 0


def test_single_gain_signed_raw_and_conventions():
    model = get_detector("cspad")
    consts = Constants.default(model)
    consts.pedestal[0] = -10
    consts.gain[0] = 2.0
    pixels = np.array([100, 101])
    raw = np.array([-4, 30], np.int16)
    raw_all = np.zeros((1, model.npix), np.int16)
    raw_all[0, pixels] = raw
    mask = np.ones(model.shape, np.uint8)
    for convention, expected in [("divide", [3.0, 20.0]), ("multiply", [12.0, 80.0]),
                                 ("none", [6.0, 40.0])]:
        cal = Calibrator(model, consts, mask, CPU, convention)
        out = cal(raw_all.reshape(1, *model.shape)).reshape(-1)[pixels]
        np.testing.assert_allclose(out, expected)


def test_masked_and_zero_gain_pixels_give_zero():
    model = get_detector("jungfrau05M")
    consts = constants_with_levels(model)
    seg, row, col = 0, 100, 100
    consts.status[1, seg, row, col] = 1          # bad in G1 only: masked in every gain
    consts.gain[0, seg, row, col + 1] = 0        # no gain: 0, not inf
    consts.mask[:, seg, row, col + 2] = 0        # user mask (calib): only cmask has it
    masks = pixel_masks(model, consts)
    assert masks["status"][seg, row, col] == 0 and masks["mask"][seg, row, col + 2] == 1
    assert masks["cmask"][seg, row, col + 2] == 0
    flat = np.ravel_multi_index((seg, row, np.array([col, col + 1, col + 2, col + 3])), model.shape)
    out = calibrate_pixels(model, consts, np.full(4, 2000, np.uint16), flat, mask=masks["cmask"])
    assert out[0] == 0 and out[1] == 0 and out[2] == 0
    assert out[3] == pytest.approx((2000 - 1000) / JUNGFRAU_DEFAULT_GAIN[0], rel=1e-6)


def test_geometric_masks():
    jf = get_detector("jungfrau05M")
    m = pixel_masks(jf, Constants.default(jf))["mask"][0]
    assert m[0].sum() == 0 and m[:, 0].sum() == 0 and m[:, -1].sum() == 0
    assert m[255].sum() == 0 and m[256].sum() == 0 and m[:, 767].sum() == 0
    assert m[100, 100] == 1
    cspad = get_detector("cspad")
    m = pixel_masks(cspad, Constants.default(cspad))["mask"][3]
    assert m[10, 10] == 0 and m[10, 204] == 0 and m[11, 10] == 0 and m[10, 9] == 0
    assert m[11, 11] == 1 and m[50, 193] == 0
    m8 = cspad.geometry_mask(unbondnbrs8=True)[3]
    assert m8[11, 11] == 0


def test_lut_holds_pedestal_plus_offset_and_inverse_gain():
    model = get_detector("jungfrau05M")
    consts = constants_with_levels(model)
    lut = build_lut(consts, np.ones(model.shape, np.uint8))
    assert lut.shape == (3, model.npix, 2)
    np.testing.assert_allclose(lut[2, 7], [1202, 1 / JUNGFRAU_DEFAULT_GAIN[2]], rtol=1e-6)


@pytest.mark.parametrize("detector", ["jungfrau05M", "epix10kquad", "cspad", "epix100"])
def test_cpu_pass_equals_reference_on_random_raw(detector):
    """The CPU pass (switch tables) gives the reference's numbers bit for bit."""
    from gpusmd.calib.calibrate import calibrate_reference, calibrate_switch, switch_tables
    model = get_detector(detector)
    rng = np.random.default_rng(1)
    npix = 4000
    rows = lut_rows(model)
    lut = rng.normal(100, 50, (rows, npix, 2)).astype(np.float32)
    lut[..., 1][rng.random((rows, npix)) < 0.1] = 0
    cb = rng.choice([0, 4, 8, 12, 16, 24, 28], npix).astype(np.uint8) if model.family == "epix10k" else None
    info = np.iinfo(model.dtype)
    raw = rng.integers(info.min, info.max, (3, npix), endpoint=True).astype(model.dtype)
    expected = calibrate_reference(raw, cb, lut, model)
    ped, scale, _ = switch_tables(lut, cb, model)
    got = calibrate_switch(raw, ped, scale, model)
    np.testing.assert_array_equal(got, expected)
