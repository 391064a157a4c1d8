"""End to end: simulate -> dark -> replay; the output layout, ROI sums against the
simulator's truth, and one-line errors before any output is written."""
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.dark import process_dark
from gpusmd.config import load_config
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run

DET = "epix10kquad"
PANEL = [[1, 2], [0, 352], [0, 384]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dark series and a data run of one epix10k quad, without common-mode offsets
    (their correction comes with the common-mode modes)."""
    d = tmp_path_factory.mktemp("replay")
    dark = simulate_run(d / "dark.h5", DET, n_events=8, dark=True, seed=3, run=1,
                        common_mode_scale=0.0)
    data = simulate_run(d / "run.h5", DET, n_events=12, seed=3, run=2, common_mode_scale=0.0)
    process_dark(dark, d / "constants.h5")
    (d / "run.yaml").write_text(textwrap.dedent(f"""\
        detectors:
          {DET}:
            calib: constants.h5
            functions:
              - {{kind: roi, name: ROI_0, bounds: {PANEL}, writeArea: true}}
              - {{kind: roi, bounds: [[0, 1], [10, 100], [20, 200]], thresADU: [0.5, null]}}
            sums: [calib, calib_max, calib_nhits5]
        """))
    out = d / "out.h5"
    summary = replay(data, load_config(d / "run.yaml"), out, get_backend(), progress=False)
    return d, data, out, summary


def test_output_layout(runs):
    d, data, out, summary = runs
    assert summary.n_events == 12
    with h5py.File(out, "r") as f, h5py.File(data, "r") as raw:
        np.testing.assert_array_equal(f["event_id"][()], raw["event_id"][()])
        np.testing.assert_array_equal(f["timestamp"][()], raw["timestamp"][()])
        np.testing.assert_array_equal(f["ipm2/sum"][()], raw["ipm2/sum"][()])
        assert "lightStatus/xray" in f
        for field in ("sum", "mean", "max", "com", "area"):
            assert f[f"{DET}/ROI_0_{field}"].shape[0] == 12
        assert f[f"{DET}/ROI_0_com"].shape == (12, 2)
        assert f[f"{DET}/ROI_0_area"].shape == (12, 1, 352, 384)
        assert f[f"{DET}/ROI_1_sum"].shape == (12,)
        cfg = f[f"UserDataCfg/{DET}"]
        for key in ("pedestal", "rms", "gain", "status", "mask", "cmask", "x", "y", "z"):
            assert key in cfg, key
        assert cfg["pedestal"].shape == (7, 4, 352, 384)
        np.testing.assert_array_equal(cfg["ROI_1__bounds"][()], [[0, 1], [10, 100], [20, 200]])
        assert cfg["ROI_1__thresADU"][0] == 0.5 and np.isnan(cfg["ROI_1__thresADU"][1])
        assert f[f"Sums/{DET}_calib"].shape == (4, 352, 384)
        assert f[f"Sums/{DET}_calib"].attrs["n_events"] == 12
        assert f.attrs["gpusmd_version"] and "ROI_0" in f.attrs["config"]
        assert f[f"{DET}/ROI_0_sum"].compression == "gzip"


def test_roi_sums_match_the_simulated_photons(runs):
    d, data, out, _ = runs
    with h5py.File(out, "r") as f, h5py.File(data, "r") as raw:
        roi = f[f"{DET}/ROI_0_sum"][()]
        cmask = f[f"UserDataCfg/{DET}/cmask"][()].astype(bool)
        truth = raw[f"truth/{DET}"]
        ev, pix, kev = truth["deposit_event"][()], truth["deposit_pixel"][()], truth["deposit_keV"][()]
        rms_kev = truth["rms"][4] / truth["gain"][4]          # AML_M: the data run's range
        xray = raw["lightStatus/xray"][()]
    inside = np.zeros(cmask.shape, bool)
    inside[1] = True
    counted = (inside & cmask).ravel()[pix]
    expected = np.bincount(ev[counted], weights=kev[counted], minlength=len(roi))
    # noise of the frame plus that of the 8-frame pedestal, over the ROI's good pixels
    sigma = np.sqrt(((rms_kev[1][cmask[1]]) ** 2).sum() * (1 + 1 / 8))
    assert expected[xray == 1].min() > 20 * sigma          # the test can tell
    np.testing.assert_array_less(np.abs(roi - expected), 5 * sigma + 1e-3 * expected)
    assert np.all(np.abs(roi[xray == 0]) < 5 * sigma)


def test_sums_are_sums_of_the_area(runs):
    _, _, out, _ = runs
    with h5py.File(out, "r") as f:
        area = f[f"{DET}/ROI_0_area"][()]
        total = f[f"Sums/{DET}_calib"][1]
        np.testing.assert_allclose(area.sum(axis=0)[0], total, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(area.max(axis=0)[0], f[f"Sums/{DET}_calib_max"][1])
        np.testing.assert_array_equal((area > 5).sum(axis=0)[0], f[f"Sums/{DET}_calib_nhits5"][1])


def test_batch_size_does_not_change_the_result(runs):
    d, data, out, _ = runs
    other = d / "out_b5.h5"
    replay(data, load_config(d / "run.yaml"), other, get_backend(), batch_size=5, progress=False)
    with h5py.File(out, "r") as a, h5py.File(other, "r") as b:
        for key in ("ROI_0_sum", "ROI_0_com", "ROI_1_mean", "ROI_0_area"):
            np.testing.assert_allclose(a[f"{DET}/{key}"][()], b[f"{DET}/{key}"][()], rtol=1e-6)


def gpusmd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gpusmd.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def test_cli_refuses_a_bad_config_before_writing(runs):
    d, data, _, _ = runs
    bad = d / "bad.yaml"
    bad.write_text((d / "run.yaml").read_text().replace("sums:", "sumz:"))
    r = gpusmd("replay", data, "--config", bad, "-o", d / "bad_out.h5", cwd=d)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "bad.yaml: detectors.epix10kquad.sumz: unknown key" in r.stderr
    assert not (d / "bad_out.h5").exists()


def test_cli_refuses_roi_outside_and_missing_constants(runs):
    d, data, _, _ = runs
    text = (d / "run.yaml").read_text()
    (d / "outside.yaml").write_text(text.replace("[20, 200]", "[400, 500]"))
    r = gpusmd("replay", data, "--config", d / "outside.yaml", "-o", d / "o1.h5", cwd=d)
    assert r.returncode == 2 and "functions[1].bounds" in r.stderr and "no pixel" in r.stderr
    (d / "nocalib.yaml").write_text(text.replace("constants.h5", "missing.h5"))
    r = gpusmd("replay", data, "--config", d / "nocalib.yaml", "-o", d / "o2.h5", cwd=d)
    assert r.returncode == 2 and "missing.h5 not found" in r.stderr
    assert not (d / "o1.h5").exists() and not (d / "o2.h5").exists()


def test_cli_refuses_raw_file_with_wrong_shape(runs):
    d, _, _, _ = runs
    wrong = d / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["event_id"] = np.arange(2)
        f["timestamp"] = np.arange(2)
        f.create_dataset(f"{DET}/raw", data=np.zeros((2, 4, 352, 380), np.uint16))
        f[f"{DET}/raw"].attrs["type"] = DET
    r = gpusmd("replay", wrong, "--config", d / "run.yaml", "-o", d / "o3.h5", cwd=d)
    assert r.returncode == 2
    assert f"{wrong}: /{DET}/raw has frames of shape (4, 352, 380)" in r.stderr
    assert not (d / "o3.h5").exists()


def test_constants_for_other_runs_are_refused(runs, tmp_path):
    d, data, _, _ = runs
    c = process_dark(d / "dark.h5", tmp_path / "constants.h5", run_max=1)
    assert c[DET].run_max == 1
    cfg = tmp_path / "run.yaml"
    cfg.write_text((d / "run.yaml").read_text())
    r = gpusmd("replay", data, "--config", cfg, "-o", tmp_path / "o.h5", cwd=tmp_path)
    assert r.returncode == 2 and "valid for runs 1-1, not for run 2" in r.stderr


def test_user_function_sees_calibrated_frames(runs):
    d, data, out, _ = runs
    text = (d / "run.yaml").read_text() + textwrap.dedent("""\
        user_functions:
          - {name: mine, function: "gpusmd.examples:total_intensity", params: {threshold: 0.0}}
        """)
    (d / "user.yaml").write_text(text)
    other = d / "out_user.h5"
    replay(data, load_config(d / "user.yaml"), other, get_backend(), progress=False)
    with h5py.File(other, "r") as f:
        area = f[f"{DET}/ROI_0_area"][()]
        total = f["mine/total"][()]
        assert total.shape == (12,)
        # the ROI covers panel 1 only: the total over the detector is at least its positive part
        assert np.all(total >= (area * (area > 0)).reshape(12, -1).sum(axis=1) - 1e-3)
        np.testing.assert_allclose(f["mine/first_share"][()], 1.0, rtol=1e-6)


def test_user_function_errors_name_the_key(runs):
    d, _, _, _ = runs
    from gpusmd.errors import ConfigError
    (d / "bad_user.yaml").write_text((d / "run.yaml").read_text()
                                     + "user_functions:\n  - {name: x, function: 'nosuch.module:f'}\n")
    with pytest.raises(ConfigError, match=r"user_functions\[0\].function: cannot load"):
        load_config(d / "bad_user.yaml")
