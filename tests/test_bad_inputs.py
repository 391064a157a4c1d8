"""Bad inputs end in one line that names the problem, before any work: a config that
is not text or not YAML, constants with NaN or inf values, a configuration step the raw
file does not have."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.constants import NON_FINITE, Constants
from gpusmd.config import load_config
from gpusmd.detectors import get_detector
from gpusmd.errors import ConfigError, ConstantsError
from gpusmd.replay import replay


def test_config_that_is_not_text_or_not_yaml(tmp_path):
    with h5py.File(tmp_path / "run.yaml", "w") as f:
        f["x"] = np.arange(1000)
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "bad.yaml").write_text("detectors:\n  epix100:\n    calib: [a, b\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 4, column 1") as e:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_non_finite_constants_are_flagged_or_refused():
    model = get_detector("epix100")
    c = Constants.default(model, pedestal=np.full((1, *model.shape), 100, np.float32))
    c.pedestal[0, 3, 4] = np.nan
    c.gain[0, 5, 6] = np.inf
    assert c.flag_non_finite("c.h5") == 2
    assert np.all(np.isfinite(c.pedestal)) and np.all(np.isfinite(c.gain))
    assert c.status[0, 3, 4] == NON_FINITE and c.status[0, 5, 6] == NON_FINITE
    assert c.gain[0, 5, 6] == 0 and c.pedestal[0, 3, 4] == 0
    assert np.count_nonzero(c.status) == 2 and c.status_mask()[3, 4] == 0
    assert c.flag_non_finite("c.h5") == 0
    nan = Constants.default(model, pedestal=np.full((1, *model.shape), np.nan, np.float32))
    with pytest.raises(ConstantsError, match="c.h5: every value of the constants is NaN"):
        nan.flag_non_finite("c.h5")


def test_replay_masks_pixels_with_nan_constants(simulated, tmp_path):
    raw = simulated("epix100", n_events=4)
    model = get_detector("epix100")
    c = Constants.default(model, pedestal=np.full((1, *model.shape), 300, np.float32))
    c.pedestal[0, 10, 10:20] = np.nan
    c.save(tmp_path / "c.h5", "epix100")
    (tmp_path / "run.yaml").write_text(
        "detectors:\n  epix100:\n    calib: c.h5\n    mask: status\n"
        "    functions:\n      - {kind: roi, bounds: [[0, 704], [0, 768]]}\n")
    replay(raw, load_config(tmp_path / "run.yaml"), tmp_path / "out.h5", get_backend("cpu"),
           progress=False)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert np.all(np.isfinite(f["epix100/ROI_0_sum"][()]))
        assert f["UserDataCfg/epix100/status"][0, 10, 15] == NON_FINITE


def test_config_step_the_raw_file_lacks_is_one_line(simulated, tmp_path):
    import shutil
    from gpusmd.calib.dark import process_dark
    dark = simulated("epix10kquad", dark=True, n_events=2)
    raw = tmp_path / "run.h5"
    shutil.copy(simulated("epix10kquad", n_events=3), raw)
    process_dark(dark, tmp_path / "c.h5")
    with h5py.File(raw, "a") as f:
        f["epix10kquad/config/step"][1] = 7
    (tmp_path / "run.yaml").write_text("detectors:\n  epix10kquad:\n    calib: c.h5\n")
    r = subprocess.run([sys.executable, "-m", "gpusmd.cli", "replay", str(raw), "--config",
                        "run.yaml", "-o", "out.h5"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no configuration step 7" in lines[0] and "run.h5" in lines[0]
    assert not (tmp_path / "out.h5").exists()
