"""A detector's ``userMask`` (a .npy of its raw shape, as `gpusmd mask` writes it) joins
cmask, so that every function and the run sums leave its pixels out; a bad one is refused
before any output is written."""
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.cli import main
from gpusmd.config import load_config
from gpusmd.errors import ConfigError
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run

CPU = get_backend("cpu")
SHAPE = (48, 64)
FUNCTIONS = """\
      - {kind: roi, bounds: [[0, 48], [0, 64]], writeArea: true}
      - {kind: projection}               # axis -1: the whole sum, pj_ax_1
      - {kind: azav, center: [0, 0], dis_to_sam: 50, qbin: 0.05}
      - {kind: droplet, threshold: 0.5, useRms: false}
    sums: [calib]
"""


def config(d, extra=""):
    path = d / f"run{len(extra)}.yaml"
    path.write_text("detectors:\n  camera:\n" + textwrap.indent(extra, "    ")
                    + "    functions:\n" + FUNCTIONS)
    return load_config(path)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermask")
    simulate_run(d / "run.h5", "camera", n_events=3, shape=SHAPE, run=4)
    return d


def test_a_mask_from_gpusmd_mask_leaves_its_pixels_out_of_every_function(d):
    plain = config(d)
    (d / "plain.yaml").write_text("detectors:\n  camera:\n    functions: []\n")
    assert main(["avimage", str(d / "run.h5"), "--config", str(d / "plain.yaml"),
                 "-o", str(d / "avg.h5"), "--backend", "cpu", "-q"]) == 0
    assert main(["mask", str(d / "avg.h5"), "--rect", "0:20,0:30", "-o", str(d / "m.npy")]) == 0
    mask = np.load(d / "m.npy")
    assert mask.shape == SHAPE and 0 < (mask == 0).sum() < mask.size
    masked = config(d, f"userMask: {d / 'm.npy'}\n")
    replay(d / "run.h5", plain, d / "plain.h5", CPU, progress=False)
    replay(d / "run.h5", masked, d / "masked.h5", CPU, progress=False)
    with h5py.File(d / "plain.h5") as p, h5py.File(d / "masked.h5") as m:
        area = p["camera/ROI_0_area"][()]
        np.testing.assert_array_equal(m["camera/ROI_0_area"][()], area * mask)
        np.testing.assert_allclose(m["camera/pj_ax_1_data"][()],
                                   (area * mask).sum(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_array_equal(m["Sums/camera_calib"][()][mask == 0], 0)
        np.testing.assert_array_equal(m["UserDataCfg/camera/cmask"][()],
                                      p["UserDataCfg/camera/cmask"][()] * mask)
        assert m["UserDataCfg/camera/user_mask_file"][()].decode() == str(d / "m.npy")
        npix = m["UserDataCfg/camera/azav_0__npix"][()].sum()
        good = p["UserDataCfg/camera/cmask"][()] != 0
        assert npix == p["UserDataCfg/camera/azav_0__npix"][()].sum() - (good & (mask == 0)).sum()
        # every pixel at or above the threshold is in a droplet: those of the masked frame
        for f, frames in ((p, area), (m, area * mask)):
            assert f["camera/var_droplet/npix"][()].sum() == (frames >= 0.5).sum()
        assert (area * mask >= 0.5).sum() < (area >= 0.5).sum()

def test_a_bad_user_mask_is_refused_before_any_output(d):
    with pytest.raises(ConfigError, match=r"detectors\.camera\.userMask: user mask file .* not found"):
        config(d, f"userMask: {d / 'nope.npy'}\n")
    np.save(d / "small.npy", np.ones((4, 4), np.uint8))
    with pytest.raises(ConfigError, match=r"detectors\.camera\.userMask: .*a mask of shape \(4, 4\)"):
        replay(d / "run.h5", config(d, f"userMask: {d / 'small.npy'}\n"), d / "bad.h5", CPU,
               progress=False)
    assert not (d / "bad.h5").exists()
