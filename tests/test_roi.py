"""ROI on hand-built frames: sum, mean, max, com, area, thresholds, nsat, user mask."""
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError
from gpusmd.features.roi import ROI

BACKEND = get_backend()          # GPUSMD_BACKEND=gpu runs these on the device
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
    np.testing.assert_allclose(out["mean"], [10 / 29, 20 / 29])
    assert out["area"].shape == (2, 6, 5) and out["area"][0, 1, 1] == 10


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
    ([[0, 17], [0, 5]], "outside the detector"),
    ([[0, 5]], "1 ranges given"),
    ([[5, 5], [0, 5]], "outside the detector"),
])
def test_bounds_are_checked(bounds, words):
    with pytest.raises(ConfigError, match=words) as e:
        make_roi({"bounds": bounds})
    assert "test.yaml: roi.bounds" in str(e.value)
