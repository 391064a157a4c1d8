"""The beamtime tools: avimage (equal to a replay's run sums), its assembly (equal to
psana's det.raw.image), beamcenter (centre within a pixel, distance within 1%, flat,
tilted, centre off the detector, from a calibrant's lines), a user mask (rectangles, circles,
polygons) through a replay, cubes that add up to the bit."""
import textwrap
from fractions import Fraction

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


def test_assembly_equals_psana_det_raw_image(beamtime, tmp_path):
    from psana import DataSource   # a test requirement (CI installs psana): never skipped
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
    for key in [k for k in whole if k.startswith(("sum/", "sum_square/", "mean/", "count/"))]:
        if key.endswith("/calib"):      # the summed images: float64 sums
            np.testing.assert_allclose(added[key], whole[key], rtol=1e-12, atol=1e-9,
                                       err_msg=key)
        else:                           # the per-event values: exact sums, the same bits
            assert np.array_equal(added[key], whole[key], equal_nan=True), key
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
        assert whole["sum/epix10kquad/ROI_0_sum"][b] == float(
            sum(Fraction(float(v)) for v in roi[sel]))
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


def tricky_smd(path, n=240, seed=5):
    """A small-data file whose values make the order of float64 additions matter: 1e16,
    1 and -1e16 mixed, random floats of magnitudes from 1e-300 to 1e150, NaN, rows of 3."""
    rng = np.random.default_rng(seed)
    tricky = rng.choice([1e16, 1.0, -1e16, 3.0, -1.0, 0.1], n)
    wild = rng.standard_normal(n) * 10.0 ** rng.integers(-300, 150, n)
    wild[rng.random(n) < 0.05] = np.nan
    rows = rng.standard_normal((n, 3)) * np.array([1e-8, 1.0, 1e12])
    rows[3, 1] = np.inf
    with h5py.File(path, "w") as f:
        f["event_id"] = np.arange(n, dtype=np.int64)
        f["scan/var"] = rng.uniform(0, 4, n)
        f["vals/tricky"] = tricky
        f["vals/wild"] = wild
        f["vals/rows"] = rows
        f["vals/f32"] = rng.standard_normal(n).astype(np.float32) * np.float32(1e5)
        f["vals/count"] = rng.integers(-2**40, 2**40, n)
    return path


def test_cubes_added_equal_the_cube_of_the_whole_to_the_bit(tmp_path, capsys):
    smd = tricky_smd(tmp_path / "smd.h5")
    bins = ["--bin", "scan/var:0:4:4"]
    assert main(["cube", str(smd), *bins, "-o", str(tmp_path / "whole.h5")]) == 0
    parts = split_smd(smd, [37, 101, 190], tmp_path)
    cubes = [tmp_path / f"c{k}.h5" for k in range(len(parts))]
    for part, cube in zip(parts, cubes):
        assert main(["cube", str(part), *bins, "-o", str(cube)]) == 0
    merged = tmp_path / "merged.h5"
    assert main(["cube", "merge", *map(str, cubes[::-1]), "-o", str(merged)]) == 0
    assert "4 cubes, " in capsys.readouterr().out
    whole = read_cube(tmp_path / "whole.h5")
    added = add_cubes(cubes)
    written = read_cube(merged)
    keys = [k for k in whole["data"] if k.split("/")[0] in ("sum", "sum_square", "mean",
                                                               "count", "exact")]
    assert {"count/vals/wild", "count/vals/rows", "exact/sum/vals/tricky"} <= set(keys)
    for key in ["nEntries", *keys]:
        assert np.array_equal(written["data"][key], whole["data"][key], equal_nan=True), key
        if not key.startswith("exact/"):
            assert np.array_equal(added[key], whole["data"][key], equal_nan=True), key
    assert written["exp"] == whole["exp"]
    assert written["attrs"]["n_events"] == whole["attrs"]["n_events"]
    # float64 additions of the parts' sums do not give the whole's: the order matters
    floats = sum(read_cube(c)["data"]["sum/vals/tricky"] for c in cubes)
    assert not np.array_equal(floats, whole["data"]["sum/vals/tricky"])
    # each sum is the exact one rounded once; the mean a groupby of the file
    with h5py.File(smd) as f:
        var, cols = f["scan/var"][()], {k: f[f"vals/{k}"][()] for k in ("tricky", "wild", "rows")}
    for b in range(4):
        sel = (var >= b) & (var < b + 1)
        assert whole["data"]["nEntries"][b] == sel.sum()
        for k, v in cols.items():
            v = v[sel].reshape(int(sel.sum()), -1)
            for j in range(v.shape[1]):
                good = v[np.isfinite(v[:, j]), j]
                exact = sum(Fraction(float(x)) for x in good)
                got = {g: whole["data"][f"{g}/vals/{k}"][b].reshape(-1)[j]
                       for g in ("sum", "sum_square", "mean")}
                assert got["sum"] == float(exact), (k, b, j)
                assert got["sum_square"] == float(sum(Fraction(float(x)) ** 2 for x in good))
                assert got["mean"] == float(exact / len(good))
                np.testing.assert_allclose(got["mean"], np.mean(good), rtol=1e-12,
                                           atol=1e-300 if k != "tricky" else 1.0)
    # merge refuses an existing output, other bins, other datasets
    assert main(["cube", "merge", *map(str, cubes), "-o", str(merged)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["cube", "merge", *map(str, cubes), "-o", str(merged), "--force"]) == 0
    assert main(["cube", str(smd), "--bin", "scan/var:0:4:2", "-o", str(tmp_path / "o.h5")]) == 0
    assert main(["cube", str(smd), *bins, "--keys", "vals/f32", "-o",
                 str(tmp_path / "k.h5")]) == 0
    capsys.readouterr()
    for other, why in (("o.h5", "binned otherwise"), ("k.h5", "other datasets")):
        assert main(["cube", "merge", str(cubes[0]), str(tmp_path / other), "-o",
                     str(tmp_path / "bad.h5")]) == 2
        assert why in capsys.readouterr().err
    assert main(["cube", "merge", str(cubes[0]), "--bin", "scan/var:0,1", "-o",
                 str(tmp_path / "bad.h5")]) == 2
    assert "--bin" in capsys.readouterr().err and not (tmp_path / "bad.h5").exists()


def test_beamcenter_from_a_calibrant(tmp_path, capsys):
    pytest.importorskip("pyFAI")
    from gpusmd.beamtime.beamcenter import calibrant_q
    center, dist = (700.0, -1800.0), 85.0
    path = ring_image(tmp_path / "ring.h5", center, dist, qs=calibrant_q("LaB6")[:3])
    out = tmp_path / "fit.json"
    assert main(["beamcenter", str(path), "--calibrant", "LaB6", "--json", str(out)]) == 0
    import json
    fit = json.loads(out.read_text())
    assert "config (azav): center: [" in capsys.readouterr().out
    assert np.hypot(*(np.asarray(fit["azav"]["center"]) - center)) < 75.0, fit["azav"]
    assert abs(fit["azav"]["dis_to_sam"] - dist) < 0.01 * dist
    assert main(["beamcenter", str(path), "--calibrant", "NoSuchPowder"]) == 2
    assert "unknown calibrant 'NoSuchPowder'" in capsys.readouterr().err


def test_mask_polygon(tmp_path, capsys):
    path = ring_image(tmp_path / "ring.h5", (0.0, 0.0), 80.0, qs=(1.0,), noise=0.0)
    av = AvImage.load(path)
    tri = np.array([[100.0, 150.0], [700.0, 300.0], [250.0, 900.0]])   # (row, col)
    text = " ".join(f"{r:g},{c:g}" for r, c in tri)
    assert main(["mask", str(path), "--polygon", text, "-o", str(tmp_path / "m.npy")]) == 0
    assert "polygon" in capsys.readouterr().out
    mask = np.load(tmp_path / "m.npy")
    # inside the triangle: every pixel centre on the same side of its three edges
    def inside(corners, u, v):
        side = [(b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])
                for a, b in zip(corners, np.roll(corners, -1, axis=0))]
        return (np.all([s > 0 for s in side], axis=0) | np.all([s < 0 for s in side], axis=0),
                np.any([np.abs(s) < 1e-6 for s in side], axis=0))
    tri_px, edge = inside(tri, av.row.astype(np.float64), av.col.astype(np.float64))
    assert tri_px.sum() > 1000 and (~tri_px).sum() > 1000
    np.testing.assert_array_equal(mask[~edge] == 0, tri_px[~edge])
    # in um: the corners as x, y, the pixels tested at their x, y
    corners = np.stack(av.to_um(tri[:, 0], tri[:, 1]), axis=1)
    text_um = " ".join(f"{float(a)!r},{float(b)!r}" for a, b in corners)
    assert main(["mask", str(path), "--polygon", text_um, "--units", "um", "-o",
                 str(tmp_path / "um.npy")]) == 0
    tri_um, edge = inside(corners, av.x.astype(np.float64), av.y.astype(np.float64))
    np.testing.assert_array_equal(np.load(tmp_path / "um.npy")[~edge] == 0, tri_um[~edge])
    assert abs(int(tri_um.sum()) - int(tri_px.sum())) < 0.05 * tri_px.sum()
    assert main(["mask", str(path), "--polygon", "1,2 3,4", "-o", str(tmp_path / "b.npy")]) == 2
    assert "at least 3 points" in capsys.readouterr().err
