"""psana geometry files: pixel coordinates equal psana's GeometryAccess for every default
file the psana wheel ships, hand-computed placements, one-line errors naming the file and
line, and the ``geometry:`` key of a detector from the config to the features and
UserDataCfg."""
import importlib.util
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.calib.constants import Constants
from gpusmd.config import load_config
from gpusmd.detectors import DETECTORS, get_detector
from gpusmd.errors import ConfigError
from gpusmd.geometry import (PSANA_DEFAULT_FILES, assemble, default_geometry, detector_coords,
                             image_index, psana_default_file, with_geometry)
from gpusmd.geometry_psana import SEGMENTS, Geometry, GeometryError
from gpusmd.processor import DetectorProcessor

TOL_UM = 1e-3
HEADER = "# PARENT IND OBJECT IND X0 Y0 Z0 ROT_Z ROT_Y ROT_X TILT_Z TILT_Y TILT_X\n"


# ---- psana, the reference (CI installs it: its absence fails, never skips) -------------
def psana_data_dir():
    spec = importlib.util.find_spec("psana")
    if spec is None:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pscalib" / "geometry" / "data"


def shipped_files():
    d = psana_data_dir()
    names = sorted(p.name for p in d.glob("geometry-def-*.data")) if d else []
    return names or ["<psana is not installed>"]


def geometry_access():
    try:
        import logging
        from psana.pscalib.geometry.GeometryAccess import GeometryAccess
    except ImportError as e:
        pytest.fail(f"psana (the reference for geometry files) is needed: {e}")
    logging.getLogger("psana").setLevel(logging.WARNING)
    return GeometryAccess


class FakeDetector:
    """What psana's Archon segment asks of a detector: the raw shape."""

    def __init__(self, shape):
        self._shape = shape
        self._calibconst = None


# Segments whose shape psana takes from the data (the raw frames), not from the file:
# psana needs a detector for them, gpusmd a segment_shape (and a pixel size for MTRXANY).
FROM_DATA = {
    "geometry-def-archon.data": dict(segment_shape=(300, 4800)),
    "geometry-def-axis.data": dict(segment_shape=(256, 512), pixel_size_um=(10.0, 10.0)),
}


def psana_coords(path, segment_shape=None, pixel_size_um=None):
    GeometryAccess = geometry_access()
    det = FakeDetector(segment_shape) if segment_shape else None
    ga = GeometryAccess(str(path), detector=det)
    algo = ga.get_seg_geo().algo
    if type(algo).__name__ == "SegGeometryMatrixAnyV1":
        p_row, p_col = pixel_size_um
        algo.init_matrix_parameters(shape=segment_shape,
                                    pix_size_rcsd_um=(p_row, p_col, min(p_row, p_col), 400))
    return ga.get_pixel_coords(), ga.get_pixel_scale_size()


def max_diff(ours, ref):
    """Largest |ours - ref| over x, y, z (NaN where psana has NaN: Archon fake columns)."""
    worst = 0.0
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        if np.isfinite(b).any():
            worst = max(worst, float(np.nanmax(np.abs(a - b))))
    return worst


@pytest.mark.parametrize("name", shipped_files())
def test_every_shipped_default_file_equals_geometry_access(name):
    geometry_access()
    path = psana_data_dir() / name
    kw = FROM_DATA.get(name, {})
    ref, pixel = psana_coords(path, **kw)
    g = Geometry.from_psana_file(path, **kw)
    assert g.shape == ref[0].shape
    assert max_diff(g.coords, ref) < TOL_UM
    assert g.pixel_size_um == pytest.approx(pixel)


def test_the_wheel_ships_the_detectors_gpusmd_knows():
    names = shipped_files()
    assert len(names) >= 19, names
    for file in PSANA_DEFAULT_FILES.values():
        assert file in names


def test_segments_take_their_shape_from_the_data_only_when_psana_does():
    d = psana_data_dir()
    with pytest.raises(GeometryError, match=r"geometry-def-archon.data: line \d+: ARCHON:V1 "
                                            r"takes its rows from the data"):
        Geometry.from_psana_file(d / "geometry-def-archon.data")
    with pytest.raises(GeometryError, match=r"MTRXANY:V1 takes its shape and pixel size"):
        Geometry.from_psana_file(d / "geometry-def-axis.data", segment_shape=(4, 5))
    # Archon with other rows: still psana's
    kw = dict(segment_shape=(75, 4800))
    ref, _ = psana_coords(d / "geometry-def-archon.data", **kw)
    assert max_diff(Geometry.from_psana_file(d / "geometry-def-archon.data", **kw).coords,
                    ref) < TOL_UM


# Segment types no shipped file uses, placed with every angle and three levels, and
# an IP origin at z > 0 (psana takes it negative).
SYNTHETIC = {
    "JUNGFRAU:V1": (1, None),
    "MTRX:64:48:54:60": (1, None),
    "MTRX:V2:40:30:20:25": (1, None),
    "ARCHON:V2": (1, dict(segment_shape=(20, 4800))),
    "EPIXHR2X2:V1": (1, None),
    "SENS2X1:V1": (1, None),
}


@pytest.mark.parametrize("seg", list(SYNTHETIC))
def test_segment_types_placed_at_any_angle_equal_geometry_access(seg, tmp_path):
    kw = SYNTHETIC[seg][1] or {}
    text = HEADER + textwrap.dedent(f"""\
        QUAD:V1 0 {seg} 0   1000.5 -2000 30   90 0 0   0.3 -0.2 0.1
        QUAD:V1 0 {seg} 1  -5000 7000 -40   270.5 2 -3   0 0 0.05
        QUAD:V1 1 {seg} 0   0 0 0   0 0 0   0 0 0
        QUAD:V1 1 {seg} 1   300 -300 10   -90 0 45   0.01 0 0
        DET:V1 0 QUAD:V1 0   100 200 300   180 0 0   1.5 0.5 -0.25
        DET:V1 0 QUAD:V1 1   -100 50 0   33 10 20   0 0 0
        IP 0 DET:V1 0   10 -20 90000   0 180 0   0.1 0.2 0.3
        """)
    path = tmp_path / "geo.data"
    path.write_text(text)
    ref, pixel = psana_coords(path, **kw)
    g = Geometry.from_psana_file(path, **kw)
    assert g.shape == (4, *ref[0].shape[1:])
    assert max_diff(g.coords, ref) < TOL_UM
    assert g.pixel_size_um == pytest.approx(pixel)
    assert np.nanmean(g.z) < -50000                  # IP z0 = +90000 taken as -90000


# ---- hand-computed placements --------------------------------------------------------
def one_segment(tmp_path, line, name="one.data"):
    path = tmp_path / name
    path.write_text(HEADER + line + "\n")
    return Geometry.from_psana_file(path)


def test_one_segment_rotated_90_about_z_and_moved(tmp_path):
    # MTRX V1: local (x, y) = (10 row, 20 col); Rz(90): (x, y) -> (-y, x); + (1000, 2000, -500)
    g = one_segment(tmp_path, "IP 0 MTRX:2:3:10:20 0  1000 2000 -500  80 0 0  10 0 0")
    assert g.shape == (1, 2, 3) and g.pixel_size_um == 10
    for (r, c), expect in {(0, 0): (1000, 2000, -500), (1, 0): (1000, 2010, -500),
                           (0, 2): (960, 2000, -500), (1, 2): (960, 2010, -500)}.items():
        np.testing.assert_allclose([g.x[0, r, c], g.y[0, r, c], g.z[0, r, c]], expect,
                                   atol=1e-9)


def test_rotation_order_is_z_then_y_then_x(tmp_path):
    # Rz(90) then Ry(90): (x, y, 0) -> (-y, x, 0) -> (0, x, y)
    g = one_segment(tmp_path, "TOP 0 MTRX:2:3:10:20 0  0 0 0  90 90 0  0 0 0")
    np.testing.assert_allclose(g.x[0], 0, atol=1e-9)
    np.testing.assert_allclose(g.y[0], 10 * np.arange(2)[:, None] + 0 * np.arange(3), atol=1e-9)
    np.testing.assert_allclose(g.z[0], 20 * np.arange(3)[None, :] + 0 * np.arange(2)[:, None],
                               atol=1e-9)
    # the z0 of an object in IP is taken negative, elsewhere it stays
    assert one_segment(tmp_path, "IP 0 MTRX:2:3:10:20 0  0 0 700  0 0 0  0 0 0").z.max() == -700
    assert one_segment(tmp_path, "TOP 0 MTRX:2:3:10:20 0  0 0 700  0 0 0  0 0 0").z.min() == 700


def test_wide_and_big_pixels_sit_where_psana_puts_them(tmp_path):
    # epix10ka: 100 um pixels, 225 um wide at the ASIC borders, placed one pitch from their
    # neighbour: columns 191 | 192 at -175 | +175 um, rows 175 | 176 at +175 | -175 um
    g = one_segment(tmp_path, "IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0")
    np.testing.assert_allclose(g.x[0, 0, [190, 191, 192, 193]], [-275, -175, 175, 275])
    np.testing.assert_allclose(g.y[0, [174, 175, 176, 177], 0], [275, 175, -175, -275])
    # Jungfrau V2: 75 um pixels; the two big pixels of an ASIC border (150 um) 150 um apart
    g = one_segment(tmp_path, "IP 0 JUNGFRAU:V2 0  0 0 0  0 0 0  0 0 0")
    dx = np.diff(g.x[0, 0])
    assert set(np.round(dx, 6)) == {75.0, 112.5, 150.0}
    np.testing.assert_allclose(dx[[254, 255, 256]], [112.5, 150, 112.5])
    np.testing.assert_allclose(np.diff(g.y[0, [254, 255, 256, 257], 0]), [112.5, 150, 112.5])
    # CsPad 2x1: 109.92 um, the two middle columns 274.8 um wide
    g = one_segment(tmp_path, "IP 0 SENS2X1:V1 0  0 0 0  0 0 0  0 0 0")
    np.testing.assert_allclose(g.x[0, 0, [193, 194]], [-(274.8 - 109.92 / 2), 274.8 - 109.92 / 2])
    np.testing.assert_allclose(g.y[0, [0, 92, 184], 0], [92 * 109.92, 0, -92 * 109.92], atol=1e-9)


def test_every_segment_type_has_a_layout():
    for name, make in SEGMENTS.items():
        kw = {"ARCHON:V1": ((3, 4800), None), "ARCHON:V2": ((3, 4800), None),
              "MTRXANY:V1": ((3, 4), 50.0)}.get(name, (None, None))
        seg = make(*kw)
        assert seg.x.shape == seg.y.shape and seg.pixel_size_um > 0, name


# ---- errors: the file, the line, the problem ------------------------------------------
BAD = {
    "too few fields": ("IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0\n",
                       r"line 2: expected 13 fields .* got 12"),
    "not a number": ("IP 0 EPIX10KA:V1 0  0 zero 0  0 0 0  0 0 0\n",
                     r"line 2: X0 ... TILT_X must be numbers"),
    "bad index": ("IP x EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n",
                  r"line 2: the indices 'x' and '0' must be integers"),
    "unknown segment": ("IP 0 EPIX42:V9 0  0 0 0  0 0 0  0 0 0\n",
                        r"line 2: unknown segment type 'EPIX42:V9'"),
    "bad matrix": ("IP 0 MTRX:12:x:5:5 0  0 0 0  0 0 0  0 0 0\n",
                   r"line 2: matrix segment 'MTRX:12:x:5:5' is not MTRX:<rows>"),
    "parent never defined": ("QUAD 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n"
                             "QUAD 1 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n"
                             "IP 0 QUAD 0  0 0 0  0 0 0  0 0 0\n",
                             r"line 3: parent QUAD 1 is never defined \(the top object is IP 0\)"),
    "cycle": ("A 0 B 0  0 0 0  0 0 0  0 0 0\n"
              "B 0 A 0  0 0 0  0 0 0  0 0 0\n"
              "IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n",
              r"line 2: B 0 is not under the top object IP 0 \(its parents form a cycle\)"),
    "only a cycle": ("A 0 B 0  0 0 0  0 0 0  0 0 0\n"
                     "B 0 A 0  0 0 0  0 0 0  0 0 0\n",
                     r"line 2: no top object"),
    "defined twice": ("IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n"
                      "IP 0 EPIX10KA:V1 0  5 0 0  0 0 0  0 0 0\n",
                      r"line 3: object EPIX10KA:V1 0 in IP 0 is already defined on line 2"),
    "segment with children": ("EPIX10KA:V1 0 EPIX10KA:V1 1  0 0 0  0 0 0  0 0 0\n"
                              "IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n",
                              r"line 2: EPIX10KA:V1 0 is a sensor segment, it cannot hold"),
    "unequal segments": ("IP 0 EPIX10KA:V1 0  0 0 0  0 0 0  0 0 0\n"
                         "IP 0 JUNGFRAU:V2 0  0 0 0  0 0 0  0 0 0\n",
                         r"line 3: segment JUNGFRAU:V2 \(512, 1024\) differs from the first"),
    "empty": ("# nothing\n\n", r"no geometry lines"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused_naming_file_and_line(case, tmp_path):
    text, message = BAD[case]
    path = tmp_path / "bad.data"
    path.write_text(HEADER + text)
    with pytest.raises(GeometryError, match=message) as e:
        Geometry.from_psana_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_missing_file_and_wrong_detector(tmp_path):
    with pytest.raises(GeometryError, match=r"nope.data: geometry file not found"):
        Geometry.from_psana_file(tmp_path / "nope.data")
    quad = Geometry.from_psana_file(psana_default_file("epix10kquad"))
    with pytest.raises(GeometryError, match=r"epix10kaquad.data: geometry of 4 segment\(s\) "
                                            r"EPIX10KA:V1 .* does not match type jungfrau1M"):
        with_geometry(get_detector("jungfrau1M"), quad)
    with pytest.raises(GeometryError, match=r"does not match type epix10k2M: shape \(16, 352"):
        detector_coords(get_detector("epix10k2M"), quad)


# ---- per-detector defaults ---------------------------------------------------------------
@pytest.mark.parametrize("type_", sorted(DETECTORS) + ["camera"])
def test_default_geometry_of_each_detector_type(type_):
    model = get_detector(type_)
    grid = model.coords_um()
    g = default_geometry(model)
    if type_ not in PSANA_DEFAULT_FILES:       # epix10k2M, camera: no shipped default
        assert g is None
        return
    (ref_x, ref_y, ref_z), _ = psana_coords(psana_default_file(type_))
    x, y, z = detector_coords(with_geometry(model, g))
    assert x.shape == model.shape
    assert max_diff((x, y, z), tuple(a.reshape(model.shape) for a in (ref_x, ref_y, ref_z))) < TOL_UM
    # the model's own default stays the regular grid (the simulator relies on it)
    for a, b in zip(model.coords_um(), grid):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(x, grid[0])


# ---- the geometry: key, from the config to the features ---------------------------------
def write_config(tmp_path, body, name="run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def jungfrau_constants(tmp_path_factory):
    d = tmp_path_factory.mktemp("jf")
    Constants.default(get_detector("jungfrau1M")).save(d / "constants.h5", "jungfrau1M")
    return d / "constants.h5"


def test_psana_default_for_jungfrau1M_reaches_image_and_azav(tmp_path, jungfrau_constants):
    cfg = load_config(write_config(tmp_path, f"""\
        detectors:
          jungfrau1M:
            calib: {jungfrau_constants}
            geometry: psana-default
            functions:
              - {{kind: image}}
              - {{kind: azav, center: [1000, -500], dis_to_sam: 80, eBeam: 9.5, qbin: 0.01}}
        """))
    model = get_detector("jungfrau1M")
    proc = DetectorProcessor(cfg.detectors["jungfrau1M"], model, get_backend("cpu"))
    (rx, ry, rz), _ = psana_coords(psana_default_file("jungfrau1M"))
    image, azav = proc.features
    # azav: the q of every pixel from psana's x, y (z constant, so smalldata's z_off = 0),
    # with smalldata_tools' h c (azimuthalBinning: 12398.4 eV A)
    d_mm, lam = 80.0, 12.3984 / 9.5
    r = np.sqrt(((rx - 1000) / 1e3) ** 2 + ((ry + 500) / 1e3) ** 2)
    q = 4 * np.pi / lam * np.sin(np.arctan2(r, d_mm) / 2)
    np.testing.assert_allclose(azav.q_map.reshape(rx.shape), q, rtol=1e-9)
    # image: placed by these coordinates (psana's to 1e-10 um; the big pixels' centres
    # lie on image pixel borders, where that noise picks the side: compare with ours)
    x, y, _ = detector_coords(proc.model)
    assert max_diff((x, y), (rx, ry)) < TOL_UM
    frame = np.random.default_rng(1).random((1, *model.shape)).astype(np.float32)
    img = proc.backend.to_host(image.process(frame)["img"])[0]
    np.testing.assert_array_equal(img, assemble(frame[0], x, y, 75.0, fill=0))
    rows, cols = image_index(x, y, 75.0)
    assert img.shape == (rows.max() + 1, cols.max() + 1) and img.shape[0] > 2 * 512
    items = proc.user_data_cfg()
    assert items["geometry_file"] == str(psana_default_file("jungfrau1M"))
    assert max_diff((items["x"], items["y"], items["z"]), (rx, ry, rz)) < TOL_UM


@pytest.mark.parametrize("value, message", [
    ("nope.data", r"geometry: geometry file .*nope.data not found"),
    ("geo.txt", r"geometry: .*geo.txt: unknown geometry format '.txt' \(known: .data"),
    ("psana-default", r"geometry: psana-default: psana ships no default geometry for a "
                      r"epix10k2M"),
    ("[1, 2]", r"geometry: expected a geometry file path or 'psana-default'"),
])
def test_bad_geometry_key_is_refused_when_the_config_is_read(tmp_path, value, message):
    (tmp_path / "geo.txt").write_text("")
    path = write_config(tmp_path, f"""\
        detectors:
          epix10k2M:
            geometry: {value}
        """)
    with pytest.raises(ConfigError, match=r"run.yaml: detectors.epix10k2M." + message):
        load_config(path)


@pytest.fixture(scope="module")
def epix100_run(tmp_path_factory):
    from gpusmd.simulate import simulate_run
    d = tmp_path_factory.mktemp("geo_replay")
    return simulate_run(d / "run.h5", "epix100", n_events=3, seed=5)


def replay_to(tmp_path, run, config_path):
    from gpusmd.replay import replay
    out = tmp_path / "out.h5"
    summary = replay(run, load_config(config_path), out, get_backend("cpu"), progress=False)
    return out, summary


def test_replay_with_a_geometry_file(tmp_path, epix100_run):
    # the psana epix100a default (ROT_Z 90, ROT_Y 180), moved and without its turn
    # about z: a file of the user's
    text = psana_default_file("epix100").read_text().splitlines()
    lines = [ln for ln in text if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    f = lines[0].split()
    f[4], f[5], f[7] = "1234", "-567", "0"
    (tmp_path / "geo.data").write_text(HEADER + " ".join(f) + "\n")
    cfg = write_config(tmp_path, """\
        detectors:
          epix100:
            geometry: geo.data
            functions:
              - {kind: image, rebin: 2}
        """)
    out, summary = replay_to(tmp_path, epix100_run, cfg)
    assert summary.n_events == 3
    ref, _ = psana_coords(tmp_path / "geo.data")
    rx, ry, rz = (a.reshape(704, 768) for a in ref)
    with h5py.File(out, "r") as h:
        u = h["UserDataCfg/epix100"]
        assert max_diff((u["x"][()], u["y"][()], u["z"][()]), (rx, ry, rz)) < TOL_UM
        assert u["geometry_file"][()].decode() == str(tmp_path / "geo.data")
        img = h["epix100/img_rebin2_img"][()]
    rows, cols = image_index(rx, ry, 50.0)
    assert img.shape == (3, (rows.max() + 2) // 2, (cols.max() + 2) // 2)
    # not turned about z: the 768 columns (x) are the image's rows, with the wide pixels
    assert rows.max() + 1 > 768 and cols.max() + 1 > 704


def test_a_geometry_that_does_not_fit_is_refused_before_any_output(tmp_path, epix100_run):
    cfg = write_config(tmp_path, f"""\
        detectors:
          epix100:
            geometry: {psana_default_file("jungfrau1M")}
        """)
    with pytest.raises(ConfigError, match=r"detectors.epix100.geometry: .*jungfrau1M.data: "
                                          r"geometry of 2 segment\(s\) JUNGFRAU:V2 .* does not "
                                          r"match detector 'epix100' \(type epix100\)"):
        replay_to(tmp_path, epix100_run, cfg)
    assert not (tmp_path / "out.h5").exists()


def test_a_detector_poni_is_the_poni_of_its_azav(tmp_path, epix100_run):
    poni = tmp_path / "calib.poni"
    poni.write_text(textwrap.dedent("""\
        poni_version: 2
        Detector: Detector
        Detector_config: {"pixel1": 5e-05, "pixel2": 5e-05, "max_shape": [704, 768]}
        Distance: 0.1
        Poni1: 0.0176
        Poni2: 0.0192
        Rot1: 0.01
        Rot2: -0.02
        Rot3: 0.0
        Wavelength: 1.3e-10
        """))
    cfg = write_config(tmp_path, """\
        detectors:
          epix100:
            geometry: calib.poni
            functions:
              - {kind: azav, qbin: 0.05}
              - {kind: azav, center: [0, 0], dis_to_sam: 50, eBeam: 9.5, qbin: 0.05}
        """)
    parsed = load_config(cfg).detectors["epix100"]
    assert parsed.functions[0].params["poni"] == str(poni)       # resolved by the config
    assert "poni" not in parsed.functions[1].params              # its own geometry wins
    out, _ = replay_to(tmp_path, epix100_run, cfg)
    with h5py.File(out, "r") as h:
        u = h["UserDataCfg/epix100"]
        assert u["azav_0__poni"][()].decode() == str(poni)
        assert u["azav_0__dis_to_sam"][()] == pytest.approx(100.0)
        assert u["azav_1__poni"][()].decode() == ""
        assert u["geometry_file"][()].decode() == str(poni)
        # a PONI gives no pixel positions: they stay the regular grid
        np.testing.assert_array_equal(u["x"][()], get_detector("epix100").coords_um()[0])
