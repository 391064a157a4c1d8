"""gpusmd plot: pictures of a small-data file that are not blank, whose axes carry their
units, whose image is the run sum over its events, with X-ray-off events, /errors rows
and a file without coordinates shown for what they are."""
import re
import shutil
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.beamtime.plot import (PANELS, overview_figure, panel_figure, plot_small_data,
                                  read_small_data)
from gpusmd.calib.dark import process_dark
from gpusmd.cli import main
from gpusmd.config import load_config
from gpusmd.geometry import assemble
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run

DET = "epix10kquad"
UNIT = re.compile(r"\[[^\]]+\]")


@pytest.fixture(scope="module")
def smd(tmp_path_factory):
    """A small-data file of 10 events (one with no X-rays) with an ROI, an azav and common
    mode 85."""
    d = tmp_path_factory.mktemp("plot")
    simulate_run(d / "dark.h5", DET, n_events=3, dark=True, seed=5, run=1)
    simulate_run(d / "run.h5", DET, n_events=10, seed=5, run=2)
    process_dark(d / "dark.h5", d / "constants.h5")
    (d / "run.yaml").write_text(textwrap.dedent(f"""\
        batch_size: 5
        detectors:
          {DET}:
            calib: constants.h5
            common_mode: 85
            functions:
              - {{kind: roi, name: ROI_0, bounds: [[0, 1], [10, 100], [20, 200]]}}
              - {{kind: azav, name: azav, center: [-500, 300], dis_to_sam: 100, qbin: 0.02}}
            sums: [calib]
        """))
    replay(d / "run.h5", load_config(d / "run.yaml"), d / "smd.h5", get_backend("cpu"),
           progress=False)
    return d / "smd.h5"


def labels_of(fig):
    """(what, text) of every axis label, title and colour-bar label of a figure."""
    out = []
    for ax in fig.get_axes():
        for what, text in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if text:
                out.append((what, text))
    return out


def test_command_writes_pictures_that_are_not_blank(smd, tmp_path, capsys):
    import matplotlib.image as mpimg
    assert main(["plot", str(smd), "-o", str(tmp_path / "pics"),
                 "--png", str(tmp_path / "all.png")]) == 0
    out = capsys.readouterr().out
    paths = [tmp_path / "all.png"] + [tmp_path / "pics" / f"{DET}_{p}.png" for p in PANELS]
    for path in paths:
        assert f"wrote {path}" in out
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 400, path
        assert path.stat().st_size < 400_000, path
        rgb = img[..., :3].reshape(-1, 3)
        assert rgb.std() > 0.05, f"{path}: blank"
        assert len(np.unique(np.round(rgb * 255).astype(np.uint8), axis=0)) > 8, path
    assert mpimg.imread(paths[0]).shape[:2] == (880, 1200)      # 15 x 11 in at 80 dpi
    # an existing picture is refused before any drawing, replaced with --force
    assert main(["plot", str(smd), "--png", str(tmp_path / "all.png")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["plot", str(smd), "--png", str(tmp_path / "all.png"), "--force"]) == 0
    assert main(["plot", str(smd), "--det", "nope"]) == 2
    assert "no detector 'nope'" in capsys.readouterr().err


def test_every_axis_and_the_colour_bar_carry_units(smd):
    data = read_small_data(smd)
    figs = {panel: panel_figure(data, DET, panel) for panel in PANELS}
    for panel, fig in figs.items():
        labels = labels_of(fig)
        assert labels, panel
        for what, text in labels:
            assert UNIT.search(text), f"{panel}: {what} label {text!r} has no unit"
    image_axes = figs["image"].get_axes()
    assert image_axes[0].get_xlabel() == "y [mm]" and image_axes[0].get_ylabel() == "x [mm]"
    assert image_axes[1].get_ylabel() == "mean calibrated value [keV]"     # the colour bar
    assert "mean of 10 events" in image_axes[0].get_title()
    assert figs["azav"].get_axes()[0].get_xlabel() == "q [1/Å]"
    assert figs["azav"].get_axes()[0].get_ylabel() == "mean per pixel [keV]"
    roi_ax = figs["roi"].get_axes()[0]
    assert roi_ax.get_xlabel() == "ipm2/sum [arb. units]"
    assert roi_ax.get_ylabel() == "ROI sum [keV]"
    assert len(overview_figure(data, DET).get_axes()) == sum(len(f.get_axes())
                                                             for f in figs.values())


def test_image_is_the_run_sum_over_its_events_with_rois_and_the_centre(smd):
    data = read_small_data(smd)
    d = data.detectors[DET]
    with h5py.File(smd) as f:
        sums = f[f"Sums/{DET}_calib"]
        mean = sums[()] / int(sums.attrs["n_events"])
    fig = panel_figure(data, DET, "image")
    ax = fig.get_axes()[0]
    shown = ax.get_images()[0]
    np.testing.assert_allclose(shown.get_array().filled(np.nan),
                               assemble(mean, d.x, d.y, d.pixel_um), rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    norm = shown.norm
    assert norm.vmin < 0 < norm.vmax                    # negative values get their colours
    assert d.pixel_um == 100.0
    assert len(ax.collections) == 1                     # the ROI's outline
    assert any(t.get_text().strip() == "ROI_0" for t in ax.texts)
    (marker,) = [ln for ln in ax.get_lines() if ln.get_marker() == "+"]
    np.testing.assert_allclose([marker.get_xdata()[0], marker.get_ydata()[0]], [0.3, -0.5])


def test_roi_sums_against_the_intensity_with_xray_off_marked(smd):
    data = read_small_data(smd)
    with h5py.File(smd) as f:
        xray, ipm = f["lightStatus/xray"][()], f["ipm2/sum"][()]
        roi = f[f"{DET}/ROI_0_sum"][()]
    assert (xray == 0).sum() == 1 and data.intensity[0] == "ipm2/sum"
    ax = panel_figure(data, DET, "roi").get_axes()[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    on = lines[next(k for k in lines if "X-rays on" in k)]
    off = lines["ROI_0, X-rays off"]
    np.testing.assert_allclose(off.get_xdata(), ipm[xray == 0])
    np.testing.assert_allclose(off.get_ydata(), roi[xray == 0])
    np.testing.assert_allclose(on.get_xdata(), ipm[xray == 1])
    assert off.get_marker() != on.get_marker()


def test_counts_show_common_mode_errors_and_status(smd, tmp_path):
    path = tmp_path / "errors.h5"
    shutil.copy(smd, path)
    rows = [(4, b"read", b"truncated frame"), (-1, b"read", b"3 more like: truncated frame"),
            (7, b"process", b"frames of shape (2, 2)")]
    with h5py.File(path, "r+") as f:
        for i, key in enumerate(("event_id", "stage", "reason")):
            ds = f[f"errors/{key}"]
            ds.resize((len(rows),))
            ds[:] = [r[i] for r in rows]
        corrected = f[f"{DET}/common_mode_corrected"][()]
    data = read_small_data(path)
    assert data.errors == {"read": 4, "process": 1}
    axes = panel_figure(data, DET, "counts").get_axes()
    cm, errors, status = axes
    np.testing.assert_array_equal(cm.get_lines()[0].get_ydata(), corrected)
    assert "common mode 85" in cm.get_title()
    labels = [t.get_text() for t in errors.get_yticklabels()]
    assert labels == ["written", "error: read", "error: process"]
    assert [round(p.get_width()) for p in errors.patches] == [10, 4, 1]
    assert "5 in /errors" in errors.get_title()
    with h5py.File(smd) as f:
        flagged = (f[f"UserDataCfg/{DET}/status"][()].astype(np.int64) != 0).any(axis=0)
    assert f"{int(flagged.sum())} of {flagged.size} flagged" in status.get_title()


def test_a_file_without_coordinates_uses_the_default_grid(smd, tmp_path):
    path = tmp_path / "nocoords.h5"
    shutil.copy(smd, path)
    with h5py.File(path, "r+") as f:
        for key in ("x", "y", "z"):
            del f[f"UserDataCfg/{DET}/{key}"]
    data = read_small_data(path)
    assert "default grid of a epix10kquad" in data.detectors[DET].coords_note
    ax = panel_figure(data, DET, "image").get_axes()[0]
    assert "default grid" in ax.get_title()
    written = plot_small_data(path, png=tmp_path / "nocoords.png")
    assert written == [tmp_path / "nocoords.png"] and written[0].stat().st_size > 10_000
