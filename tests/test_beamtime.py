"""The beamtime tools: avimage (equal to a replay's run sums), its assembly (equal to
psana's det.raw.image), beamcenter (centre within a pixel, distance within 1%, flat,
tilted, centre off the detector), a user mask through a replay, cubes that add up."""
import importlib.util
import textwrap

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.beamtime.avimage import AvImage, average_image, write_avimage
from gpusmd.beamtime.beamcenter import (center_of_spot, fit_beam_center, spot_of_center,
                                        two_theta, tth_of_q)
from gpusmd.beamtime.cube import add_cubes, read_cube
from gpusmd.beamtime.select import Selection
from gpusmd.calib.dark import process_dark
from gpusmd.cli import main
from gpusmd.config import load_config
from gpusmd.detectors import get_detector
from gpusmd.geometry import (assemble, default_geometry, detector_coords, image_index,
                             with_geometry)
from gpusmd.replay import replay

CPU = get_backend("cpu")
HAVE_PSANA = importlib.util.find_spec("psana") is not None


# ---- beamcenter ------------------------------------------------------------------------
def ring_image(path, center, dist, tilt=(0.0, 0.0), qs=(1.0, 1.8, 2.6), ebeam=9.5,
               det="jungfrau1M", width_deg=0.05, noise=0.05, seed=0):
    """An average-image file whose image holds rings of q ``qs`` of the geometry (centre,
    distance, tilts as the azav takes them), made from the pixel coordinates of the psana
    default geometry of ``det``."""
    model = with_geometry(get_detector(det), default_geometry(get_detector(det)))
    x, y, z = (np.asarray(c, np.float64) for c in detector_coords(model))
    tth = np.degrees(two_theta(x, y, z.mean() - z, center, dist, *tilt))
    img = np.full(model.shape, 0.2)
    for t in np.degrees(tth_of_q(qs, ebeam)):
        img += np.exp(-0.5 * ((tth - t) / width_deg) ** 2)
    img += noise * np.random.default_rng(seed).standard_normal(img.shape)
    mask = model.geometry_mask().astype(np.uint8)
    attrs = {"format": "gpusmd-avimage", "format_version": 1, "detector": det,
             "type": model.type, "stat": "mean", "n_events": 1, "selection": "",
             "units": "keV", "pixel_size_um": model.pixel_size_um, "xmin_um": x.min(),
             "ymin_um": y.min()}
    return write_avimage(path, {"images": {"mean": (img * mask).astype(np.float32)},
                                "x": x, "y": y, "z": z, "mask": mask,
                                "status": np.zeros((1, *model.shape), np.uint8),
                                "event_id": np.zeros(1, np.int64), "attrs": attrs})


CASES = {  # centre (um), distance (mm), tilts (deg), q of the rings
    "flat": ((1200.0, -2300.0), 80.0, (0.0, 0.0), (1.0, 1.8, 2.6)),
    "tilted": ((900.0, -1500.0), 90.0, (2.0, -3.0), (1.0, 1.8, 2.6)),
    "off-detector": ((-52000.0, 6000.0), 70.0, (0.0, 0.0), (2.2, 2.9, 3.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_beamcenter_finds_the_centre_and_distance(case, tmp_path):
    center, dist, tilt, qs = CASES[case]
    av = AvImage.load(ring_image(tmp_path / "ring.h5", center, dist, tilt, qs))
    assert case != "off-detector" or center[0] < av.x.min() - 5000
    bc = fit_beam_center(av, q_known=list(qs), ebeam_keV=9.5, fit_tilt=case == "tilted")
    p = av.pixel_size_um
    assert abs(bc.center_um[0] - center[0]) < p and abs(bc.center_um[1] - center[1]) < p, \
        bc.center_um
    assert abs(bc.distance_mm - dist) < 0.01 * dist
    assert [r.q_known for r in bc.rings].count(True) == 3
    if case == "tilted":
        assert abs(bc.tx_deg - tilt[0]) < 0.1 and abs(bc.ty_deg - tilt[1]) < 0.1


def test_beamcenter_command_prints_the_azav_centre_and_writes_a_poni(tmp_path, capsys):
    center, dist, _, qs = CASES["flat"]
    path = ring_image(tmp_path / "ring.h5", center, dist, qs=qs)
    args = [str(path), "--png", str(tmp_path / "fit.png"), "--poni", str(tmp_path / "g.poni")]
    assert main(["beamcenter", *args, "--ring", "1.0", "--ring", "1.8", "--ring", "2.6"]) == 0
    out = capsys.readouterr().out
    assert "config (azav): center: [" in out and "dis_to_sam: 8" in out and "Poni1:" in out
    assert (tmp_path / "fit.png").stat().st_size > 0
    # the PONI's geometry, pyFAI's formulas, gives the rings' 2theta where they are
    from gpusmd.config import Where
    from gpusmd.features.azimuthal import image_origin, pixel_angles, pyfai_rotation, read_poni
    av = AvImage.load(path)
    poni = read_poni(tmp_path / "g.poni", Where("g.poni"))
    x0, y0 = image_origin(av.x, av.y, 75.0, 75.0)
    abc = ((x0 + poni["poni1"] * 1e6) / 1e3, (y0 + poni["poni2"] * 1e6) / 1e3,
           poni["dist"] * 1e3)
    tth = pixel_angles(av.x / 1e3, av.y / 1e3, abc,
                       pyfai_rotation(poni["rot1"], poni["rot2"], poni["rot3"]))[0]
    truth = two_theta(av.x, av.y, 0.0, center, dist)
    assert np.abs(tth - truth).max() < 2e-4          # rad: within a fraction of a pixel
    # nothing replaced without --force
    assert main(["beamcenter", *args]) == 2
    assert "exists" in capsys.readouterr().err


def test_beamcenter_circles_only_and_the_direct_beam_of_a_tilt():
    assert spot_of_center(center_of_spot((1.0, 2.0), 80.0, 2.0, -3.0), 80.0, 2.0, -3.0) \
        == pytest.approx((1.0, 2.0))


def test_beamcenter_without_known_rings_fits_circles(tmp_path):
    center, dist, _, qs = CASES["flat"]
    av = AvImage.load(ring_image(tmp_path / "ring.h5", center, dist, qs=qs))
    bc = fit_beam_center(av, distance_mm=dist, ebeam_keV=9.5)
    assert np.hypot(bc.center_um[0] - center[0], bc.center_um[1] - center[1]) < 75.0
    assert [round(r.q, 2) for r in bc.rings] == list(qs)


# ---- a simulated run: avimage, mask, cube ------------------------------------------------
@pytest.fixture(scope="module")
def beamtime(tmp_path_factory):
    from gpusmd.simulate import simulate_run
    d = tmp_path_factory.mktemp("beamtime")
    simulate_run(d / "dark.h5", "epix10kquad", n_events=4, dark=True, seed=3, run=1)
    simulate_run(d / "run.h5", "epix10kquad", n_events=16, seed=3, run=2)
    process_dark(d / "dark.h5", d / "constants.h5")
    (d / "run.yaml").write_text(textwrap.dedent("""\
        batch_size: 4
        detectors:
          epix10kquad:
            calib: constants.h5
            common_mode: 85
            functions:
              - {kind: roi, name: ROI_0, bounds: [[0, 2], [10, 100], [20, 200]]}
            sums: [calib, calib_max]
        """))
    replay(d / "run.h5", load_config(d / "run.yaml"), d / "smd.h5", CPU, progress=False)
    return d


def test_avimage_mean_equals_the_replay_run_sum_over_its_events(beamtime, tmp_path, capsys):
    d = beamtime
    out = tmp_path / "avg.h5"
    assert main(["avimage", str(d / "run.h5"), "--config", str(d / "run.yaml"), "-n", "16",
                 "-o", str(out), "--png", str(tmp_path / "avg.png"), "--backend", "cpu",
                 "-q"]) == 0
    with h5py.File(d / "smd.h5") as f:
        total = f["Sums/epix10kquad_calib"]
        n = int(total.attrs["n_events"])
        mean = total[()] / n
        peak = f["Sums/epix10kquad_calib_max"][()]
    av = AvImage.load(out)
    assert n == 16 and av.attrs["n_events"] == 16
    np.testing.assert_allclose(av.image, mean, rtol=1e-6, atol=1e-6)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["max"][()], peak)
        # the assembled image: the image placed by its own coordinates
        np.testing.assert_array_equal(f["assembled/image"][()],
                                      assemble(av.image, av.x, av.y, av.pixel_size_um))
    assert main(["avimage", str(d / "run.h5"), "--config", str(d / "run.yaml"),
                 "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_avimage_selection_and_statistics(beamtime):
    d = beamtime
    config = load_config(d / "run.yaml")
    r = average_image(d / "run.h5", config, n_events=5, selection=Selection(
        ["lightStatus/xray==1"]), stat="median", backend=CPU, progress=False)
    with h5py.File(d / "run.h5") as f:
        on = f["event_id"][()][f["lightStatus/xray"][()] == 1]
    np.testing.assert_array_equal(r["event_id"], on[:5])
    assert r["images"]["median"].shape == (4, 352, 384)
    assert (r["images"]["std"] >= 0).all()
    from gpusmd.errors import GpusmdError
    with pytest.raises(GpusmdError, match="no per-event value 'nope/x'"):
        average_image(d / "run.h5", config, selection=Selection(["nope/x>1"]), backend=CPU)


@pytest.mark.skipif(not HAVE_PSANA, reason="psana is not installed")
def test_assembly_equals_psana_det_raw_image(beamtime, tmp_path):
    from psana import DataSource
    from gpusmd.io.xtc2 import write_xtc2
    write_xtc2(beamtime / "run.h5", tmp_path / "run.xtc2")
    run = next(DataSource(files=str(tmp_path / "run.xtc2"), skip_calib_load="all").runs())
    det = run.Detector("epix10kquad")
    nda = np.random.default_rng(1).random((4, 352, 384)).astype(np.float32)
    theirs = det.raw.image(next(run.events()), nda=nda)
    model = with_geometry(get_detector("epix10kquad"), default_geometry(get_detector("epix10kquad")))
    x, y, _ = detector_coords(model)
    ours = assemble(nda, x, y, model.pixel_size_um)
    assert ours.shape == theirs.shape
    hit = np.isfinite(ours)     # psana fills the few holes between pixels from neighbours
    np.testing.assert_array_equal(ours[hit], theirs[hit])
    assert (~hit).sum() > 0 and np.count_nonzero(theirs[~hit]) < 20


def test_a_mask_named_in_a_config_removes_its_pixels(beamtime, tmp_path, capsys):
    d = beamtime
    avg = tmp_path / "avg.h5"
    assert main(["avimage", str(d / "run.h5"), "--config", str(d / "run.yaml"), "-n", "4",
                 "-o", str(avg), "--backend", "cpu", "-q"]) == 0
    mask_path = tmp_path / "mask.npy"
    assert main(["mask", str(avg), "--rect", "0:60,0:150", "--circle", "30,300,12",
                 "--from-status", "1,2", "-o", str(mask_path),
                 "--png", str(tmp_path / "mask.png")]) == 0
    mask = np.load(mask_path)
    av = AvImage.load(avg)
    assert mask.shape == (4, 352, 384) and mask.dtype == np.uint8
    rows, cols = image_index(av.x, av.y, av.pixel_size_um)
    np.testing.assert_array_equal(mask[(rows < 60) & (cols < 150)], 0)
    assert (mask[(av.status.astype(np.int64) & 3).any(axis=0)] == 0).all()
    (tmp_path / "run.yaml").write_text(textwrap.dedent(f"""\
        detectors:
          epix10kquad:
            calib: {d / 'constants.h5'}
            functions:
              - {{kind: roi, name: whole, bounds: [[0, 4], [0, 352], [0, 384]], writeArea: true}}
              - {{kind: roi, name: masked, bounds: [[0, 4], [0, 352], [0, 384]], writeArea: true,
                  userMask: {mask_path}}}
              - {{kind: azav, name: az, center: [0, 0], dis_to_sam: 100, userMask: {mask_path}}}
              - {{kind: azav, name: az_all, center: [0, 0], dis_to_sam: 100}}
        """))
    replay(d / "run.h5", load_config(tmp_path / "run.yaml"), tmp_path / "smd.h5", CPU,
           progress=False, max_events=2)
    with h5py.File(tmp_path / "smd.h5") as f:
        whole, masked = f["epix10kquad/whole_area"][()], f["epix10kquad/masked_area"][()]
        np.testing.assert_array_equal(masked, whole * mask)
        assert (mask == 0).sum() > 1000 and np.count_nonzero(whole[:, mask == 0]) > 0
        cfg = f["UserDataCfg/epix10kquad"]
        good = cfg["cmask"][()] != 0
        assert cfg["az_all__npix"][()].sum() - cfg["az__npix"][()].sum() == (good & (mask == 0)).sum()


def split_smd(src, parts, out_dir):
    """The small-data file ``src`` cut into files of consecutive events (``parts``: the
    first event of each part but the first)."""
    paths = []
    with h5py.File(src) as f:
        n = f["event_id"].shape[0]
        bounds = [0, *parts, n]
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            path = out_dir / f"part{k}.h5"
            with h5py.File(path, "w") as g:
                def copy(name, obj):
                    if isinstance(obj, h5py.Dataset) and obj.ndim and obj.shape[0] == n \
                            and not name.startswith(("UserDataCfg", "Sums", "errors")):
                        g.create_dataset(name, data=obj[a:b])
                f.visititems(copy)
            paths.append(path)
    return paths


def test_cube_of_two_halves_adds_up_to_the_whole_and_means_are_a_groupby(beamtime, tmp_path):
    d = beamtime
    common = ["--bin", "lightStatus/laser:0,1,2", "--filter", "ipm2/sum>0.3", "--raw",
              str(d / "run.h5"), "--config", str(d / "run.yaml"), "--backend", "cpu", "-q"]
    assert main(["cube", str(d / "smd.h5"), *common, "-o", str(tmp_path / "whole.h5")]) == 0
    halves = split_smd(d / "smd.h5", [7], tmp_path)
    for k, half in enumerate(halves):
        assert main(["cube", str(half), *common, "-o", str(tmp_path / f"c{k}.h5")]) == 0
    added = add_cubes([tmp_path / "c0.h5", tmp_path / "c1.h5"])
    whole = read_cube(tmp_path / "whole.h5")["data"]
    np.testing.assert_array_equal(added["nEntries"], whole["nEntries"])
    for key in [k for k in whole if k.startswith(("sum/", "sum_square/"))]:
        np.testing.assert_allclose(added[key], whole[key], rtol=1e-12, atol=1e-9, err_msg=key)
    assert "sum/epix10kquad/calib" in whole and whole["sum/epix10kquad/calib"].shape == (2, 4, 352, 384)
    # the per-bin mean of a feature: a NumPy groupby of the small-data file
    with h5py.File(d / "smd.h5") as f:
        laser, ipm = f["lightStatus/laser"][()], f["ipm2/sum"][()]
        roi = f["epix10kquad/ROI_0_sum"][()]
    keep = ipm > 0.3
    for b in (0, 1):
        sel = keep & (laser >= b) & (laser < b + 1)
        assert whole["nEntries"][b] == sel.sum()
        np.testing.assert_allclose(whole["mean/epix10kquad/ROI_0_sum"][b], roi[sel].mean(),
                                   rtol=1e-12)
    # the image cube: the calibrated frames of a bin, summed (a bin's mean image)
    av = average_image(d / "run.h5", load_config(d / "run.yaml"), n_events=16,
                       selection=Selection(["ipm2/sum>0.3", "lightStatus/laser==1"]),
                       backend=CPU, progress=False)
    np.testing.assert_allclose(whole["mean/epix10kquad/calib"][1], av["images"]["mean"],
                               rtol=1e-5, atol=1e-5)


def test_cube_refuses_bad_bins_and_columns(beamtime, tmp_path, capsys):
    d = beamtime
    assert main(["cube", str(d / "smd.h5"), "--bin", "scan/none:0,1", "-o",
                 str(tmp_path / "c.h5")]) == 2
    assert "no per-event value 'scan/none'" in capsys.readouterr().err
    assert main(["cube", str(d / "smd.h5"), "--bin", "ipm2/sum:1,0", "-o",
                 str(tmp_path / "c.h5")]) == 2
    assert "strictly increasing" in capsys.readouterr().err
    assert not (tmp_path / "c.h5").exists()
