"""ROI on hand-built frames: sum, mean, max, com, area, thresholds, nsat, user mask."""
import numpy as np
import pytest

from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features.roi import ROI

from conftest import backend_or_skip

BACKEND = backend_or_skip()       # GPUSMD_BACKEND=gpu runs these on the device
CAM = get_detector("camera", (16, 20))


def make_roi(params, model=CAM, mask=None):
    mask = np.ones(model.shape, np.uint8) if mask is None else mask
    ROI.check_params(params, Where("test.yaml", "roi"))
    return ROI("ROI_0", params, model, {"cmask": mask}, BACKEND, Where("test.yaml", "roi"))


def frames():
    f = np.zeros((2, 16, 20), np.float32)
    f[0, 5, 6] = 10
    f[0, 7, 8] = 30
    f[1, 9, 9] = 20
    f[1, 0, 0] = 1000            # outside the ROI
    return f


def run(roi, f):
    out = roi.process(BACKEND.asarray(f))
    return {k: BACKEND.to_host(v) for k, v in out.items()}


def test_sum_mean_max_com():
    out = run(make_roi({"bounds": [[4, 10], [5, 10]]}), frames())
    np.testing.assert_allclose(out["sum"], [40, 20])
    np.testing.assert_allclose(out["mean"], [40 / 30, 20 / 30])
    np.testing.assert_allclose(out["max"], [30, 20])
    np.testing.assert_allclose(out["com"], [[6.5, 7.5], [9, 9]])
    assert "area" not in out and "nsat" not in out


def test_thresholds_and_nsat_leave_the_frame_alone():
    f = frames()
    before = f.copy()
    out = run(make_roi({"bounds": [[4, 10], [5, 10]], "thresADU": [15, 25]}), f)
    np.testing.assert_allclose(out["sum"], [0, 20])      # 10 below, 30 above
    np.testing.assert_array_equal(out["nsat"], [1, 0])
    np.testing.assert_array_equal(f, before)
    out = run(make_roi({"bounds": [[4, 10], [5, 10]], "thresADU": 15}), f)
    np.testing.assert_allclose(out["sum"], [30, 20])


def test_user_mask_and_area(tmp_path):
    user = np.ones((6, 5), np.uint8)
    user[3, 3] = 0                       # pixel (7, 8)
    np.save(tmp_path / "m.npy", user)
    out = run(make_roi({"bounds": [[4, 10], [5, 10]], "userMask": str(tmp_path / "m.npy"),
                        "writeArea": True}), frames())
    np.testing.assert_allclose(out["sum"], [10, 20])
    # smalldata_tools ROIFunc.process: ROIdata.filled(fill_value=0).mean(), the masked
    # pixel counted as 0: the sum over all 30 pixels of the ROI
    np.testing.assert_allclose(out["mean"], [10 / 30, 20 / 30])
    assert out["area"].shape == (2, 6, 5) and out["area"][0, 1, 1] == 10
    good = run(make_roi({"bounds": [[4, 10], [5, 10]], "userMask": str(tmp_path / "m.npy"),
                         "meanOver": "good"}), frames())
    np.testing.assert_allclose(good["mean"], [10 / 29, 20 / 29])     # the 29 good pixels


def test_detector_mask_excludes_pixels():
    mask = np.ones(CAM.shape, np.uint8)
    mask[7, 8] = 0
    out = run(make_roi({"bounds": [[4, 10], [5, 10]]}, mask=mask), frames())
    np.testing.assert_allclose(out["sum"], [10, 20])


def test_segmented_roi_com_in_detector_coordinates():
    model = get_detector("epix10kquad")
    f = np.zeros((1, *model.shape), np.float32)
    f[0, 1, 20, 30] = 5
    f[0, 2, 22, 30] = 15
    out = run(make_roi({"bounds": [[1, 3], [10, 40], [20, 50]]}, model), f)
    np.testing.assert_allclose(out["sum"], [20])
    np.testing.assert_allclose(out["com"], [[21.5, 30]])


@pytest.mark.parametrize("bounds, words", [
    ([[0, 5]], "1 ranges given"),
    ([[5, 5], [0, 5]], "holds no pixel"),
    ([[16, 30], [0, 5]], "holds no pixel"),
])
def test_bounds_are_checked(bounds, words):
    with pytest.raises(ConfigError, match=words) as e:
        make_roi({"bounds": bounds})
    assert "test.yaml: roi.bounds" in str(e.value)


@pytest.mark.parametrize("given, used", [
    ([[0, 17], [0, 5]], ((0, 16), (0, 5))),          # high end clipped to the detector
    ([[4.7, 10.2], [5.0, 9.9]], ((4, 10), (5, 9))),  # numbers truncated (astype(int))
    ([[10, 4], [9, 5]], ((4, 10), (5, 9))),          # either order (min, max)
    ([4, 10], ((4, 10), (0, 20))),                   # one pair: the first axis
    ([[-3, 5], [0, 1e6]], ((0, 5), (0, 20))),
])
def test_bounds_taken_as_smalldata_tools_takes_them(given, used):
    """smalldata_tools ana_funcs/roi_rebin.py ROIFunc.applyROI: [min, max] of each pair,
    the max clipped to the array's size, then .astype(int); a 1-d bound slices axis 0."""
    roi = make_roi({"bounds": given})
    assert roi.bounds == used
    out = run(roi, frames())
    f = frames()[(slice(None), *(slice(*b) for b in used))]
    np.testing.assert_allclose(out["sum"], f.sum(axis=(1, 2)))
    np.testing.assert_allclose(out["mean"], f.mean(axis=(1, 2)), rtol=1e-6)


def test_smalldata_names_of_the_function_and_its_bounds(tmp_path):
    """A smalldata_tools producer's ROIFunc(ROI=..., writeArea=True) as it is."""
    from gpusmd.config import load_config
    from gpusmd.features import FEATURES, KIND_ALIASES
    assert set(KIND_ALIASES.values()) <= set(FEATURES)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("detectors:\n  cam:\n    type: camera\n    functions:\n"
                   "      - {kind: ROIFunc, ROI: [[4, 10], [5, 10]], writeArea: true}\n"
                   "      - {kind: projectionFunc, axis: 0, parent: ROI_0}\n")
    det = load_config(cfg).detectors["cam"]
    assert [(f.kind, f.name) for f in det.functions] == [("roi", "ROI_0"),
                                                         ("projection", "ROI_0_pj_ax_0")]
    assert det.functions[0].params["bounds"] == [[4, 10], [5, 10]]
    for bad, words in [("{kind: ROIfunc, ROI: [[0, 1], [0, 1]]}", "'ROIfunc' is not one of"),
                       ("{kind: ROIFunc, ROI: [[0, 1], [0, 1]], bounds: [[0, 1], [0, 1]]}",
                        "given twice")]:
        cfg.write_text(f"detectors:\n  cam:\n    type: camera\n    functions:\n      - {bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_config(cfg)


def test_a_function_on_an_roi_takes_the_roi_noise():
    """smalldata_tools ROIFunc.addFunc hands a droplet on the ROI the ROI's rms
    (applyROI(det.rms)); so does a projection with thresRms."""
    from gpusmd.features.projection import Projection
    roi = make_roi({"bounds": [[4, 10], [5, 10]]})
    rms = np.arange(16 * 20, dtype=np.float32).reshape(16, 20)
    np.testing.assert_array_equal(roi.child_map(rms), rms[4:10, 5:10])
    pj = Projection("pj", {"axis": 0, "thresRms": 0.1}, CAM, {}, BACKEND,
                    Where("test.yaml", "pj"), input_shape=roi.output_shape,
                    rms=roi.child_map(rms))
    f = frames()
    area = f[:, 4:10, 5:10]
    np.testing.assert_allclose(BACKEND.to_host(pj.process(BACKEND.asarray(area))["data"]),
                               np.where(area < 0.1 * rms[4:10, 5:10], 0, area).sum(axis=1))
