"""The demo runs end to end: raw files, constants, small data, plot."""
import h5py

from gpusmd.demo import run_demo


def test_demo_small(tmp_path, capsys):
    summary, report = run_demo(tmp_path, detector="epix10kquad", n_events=6, n_dark=3,
                               backend="cpu")
    assert summary.n_events == 6
    for name in ("dark.h5", "run.h5", "constants.h5", "run.yaml", "run_smd.h5", "demo.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with h5py.File(tmp_path / "run_smd.h5", "r") as f:
        assert f["epix10kquad/ROI_0_sum"].shape == (6,)
    assert "ROI_0 mean sum" in capsys.readouterr().out
