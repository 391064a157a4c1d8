"""psana2 as a source and as the reference: XTC2 runs written with psana's own writer
from simulated raw runs; their replay, dark and services file equal those of the raw
file; psana's det.raw.calib (constants injected) equals gpusmd's calibration bit for
bit; epix10ka gain ranges decoded from a configuration in psana's ASIC order equal
psana's; bad psana sources are refused in one line, before any output."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from psana import DataSource   # a test requirement (CI installs psana): never skipped

from gpusmd.backend import get_backend
from gpusmd.calib.constants import Constants
from gpusmd.calib.dark import process_dark
from gpusmd.calib.psana_constants import to_psana
from gpusmd.config import load_config
from gpusmd.errors import RawFileError
from gpusmd.io.compare import read_datasets
from gpusmd.io.psana_layout import (panel_from_psana_asics, psana_asics_from_panel,
                                    psana_time_to_ns, ns_to_psana_time, trbit_from_psana,
                                    trbit_to_psana)
from gpusmd.io.source import open_run
from gpusmd.io.xtc2 import write_xtc2
from gpusmd.replay import build_processors, replay
from gpusmd.runinfo import RunInfo
from gpusmd.simulate import simulate_run

from conftest import assert_same_datasets

CPU = get_backend("cpu")


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """twins(detector) -> folder with dark.h5 / dark.xtc2, constants.h5 (from dark.h5),
    run.h5 / run.xtc2: one simulated detector, each run in both forms."""
    cache = {}

    def make(det):
        if det not in cache:
            d = tmp_path_factory.mktemp(det)
            simulate_run(d / "dark.h5", det, n_events=4, dark=True, seed=5, run=1)
            simulate_run(d / "run.h5", det, n_events=6, seed=5, run=2)
            process_dark(d / "dark.h5", d / "constants.h5")
            for name in ("dark", "run"):
                write_xtc2(d / f"{name}.h5", d / f"{name}.xtc2")
            cache[det] = d
        return cache[det]

    return make


def write_config(d, det, body):
    (d / "run.yaml").write_text(textwrap.dedent(body).replace("DET", det))
    return load_config(d / "run.yaml")


CONFIGS = {
    "epix10kquad": """\
        detectors:
          DET:
            calib: constants.h5
            common_mode: 85
            functions:
              - {kind: roi, name: ROI_0, bounds: [[1, 2], [0, 352], [0, 384]], writeArea: true}
              - {kind: projection, parent: ROI_0, axis: 1}
              - {kind: droplet, threshold: 5, thresholdLow: 3, nData: 20}
            sums: [calib, calib_max]
        """,
    "jungfrau1M": """\
        detectors:
          DET:
            calib: constants.h5
            common_mode: 7
            functions:
              - {kind: roi, bounds: [[0, 2], [100, 300], [200, 600]]}
              - {kind: azav, center: [0, 0], dis_to_sam: 100, eBeam: 9.5, qbin: 0.05}
            sums: [calib]
        """,
    "epix100": """\
        detectors:
          DET:
            calib: constants.h5
            common_mode: 46
            functions:
              - {kind: roi, bounds: [[100, 400], [100, 500]]}
              - {kind: photons, ADU_per_photon: 9.5, thr_fraction: 0.9, nData: 30}
        """,
}


# ---- the run interface -------------------------------------------------------------------
def test_psana_run_gives_the_raw_runs_events(twins):
    d = twins("epix10kquad")
    with open_run(d / "dark.h5") as a, open_run(d / "dark.xtc2") as b:
        assert (b.run, b.experiment, b.name) == (a.run, a.experiment, "dark.xtc2")
        assert b.detectors == a.detectors
        assert b.scalar_dtypes == a.scalar_dtypes
        assert b.n_events is None                 # known once read through
        bits_a, bits_b = a.step_control_bits("epix10kquad"), b.step_control_bits("epix10kquad")
        assert sorted(bits_b) == sorted(bits_a) == [0, 1, 2, 3, 4]
        for k in bits_a:
            np.testing.assert_array_equal(bits_b[k], bits_a[k])
        pairs = list(zip(a.batches(3, one_step=True), b.batches(3, one_step=True), strict=True))
        assert b.n_events == a.n_events == 20
        for x, y in pairs:
            assert (x.start, len(x)) == (y.start, len(y))
            np.testing.assert_array_equal(y.event_id, x.event_id)
            np.testing.assert_array_equal(y.timestamp, x.timestamp)
            np.testing.assert_array_equal(y.steps["epix10kquad"], x.steps["epix10kquad"])
            np.testing.assert_array_equal(y.frames["epix10kquad"], x.frames["epix10kquad"])
            for k in x.scalars:
                assert y.scalars[k].dtype == x.scalars[k].dtype
                np.testing.assert_array_equal(y.scalars[k], x.scalars[k])
        # a second pass reads the run again from its start
        assert sum(len(x) for x in b.batches(7, max_events=9)) == 9


def test_a_directory_of_xtc2_files_is_a_run(twins, tmp_path):
    import shutil
    d = twins("epix100")
    shutil.copy(d / "run.xtc2", tmp_path / "sim-r0002-s000-c000.xtc2")
    with open_run(tmp_path) as run, open_run(d / "run.h5") as raw:
        assert run.run == 2 and run.name == tmp_path.name
        ids = np.concatenate([b.event_id for b in run.batches(4)])
        np.testing.assert_array_equal(ids, raw.event_id)


def test_clock_and_asic_order_round_trip():
    rng = np.random.default_rng(1)
    for ns in (1_700_000_000 * 10**9 + 123, 631152000 * 10**9, 4_000_000_000 * 10**9 + 999_999_999):
        assert psana_time_to_ns(ns_to_psana_time(ns)) == ns
    with pytest.raises(ValueError, match="outside psana's clock"):
        ns_to_psana_time(10**9)
    panel = rng.integers(0, 256, (352, 384)).astype(np.uint8)
    np.testing.assert_array_equal(panel_from_psana_asics(psana_asics_from_panel(panel)), panel)
    tr = np.array([1, 0, 0, 1], np.uint8)
    np.testing.assert_array_equal(trbit_from_psana(trbit_to_psana(tr)), tr)
    # psana's ASIC 0 is the bottom right one, not rotated; its ASIC 2 the top left, rotated
    pca = np.zeros((4, 178, 192), np.uint8)          # the DAQ's two extra rows are dropped
    pca[0, 0, 0], pca[2, 0, 0] = 7, 9
    p = panel_from_psana_asics(pca)
    assert p[176, 192] == 7 and p[175, 191] == 9 and np.count_nonzero(p) == 2


# ---- the same files from XTC2 and from HDF5 ------------------------------------------------
@pytest.mark.parametrize("det", list(CONFIGS))
def test_replay_of_xtc2_equals_replay_of_raw(twins, det):
    d = twins(det)
    config = write_config(d, det, CONFIGS[det])
    a = replay(d / "run.h5", config, d / "from_h5.h5", CPU, batch_size=4, progress=False)
    b = replay(d / "run.xtc2", config, d / "from_xtc2.h5", CPU, batch_size=4, progress=False)
    assert a.n_events == b.n_events == 6
    assert_same_datasets(d / "from_h5.h5", d / "from_xtc2.h5")
    data = read_datasets(d / "from_xtc2.h5")
    assert len([k for k in data if k.startswith(f"{det}/")]) >= 2
    assert {"ipm2/sum", "lightStatus/xray", "event_id", "timestamp"} <= set(data)


def test_dark_of_xtc2_series_equals_dark_of_raw(twins, tmp_path):
    for det in ("epix10kquad", "jungfrau1M", "epix100"):
        d = twins(det)
        process_dark(d / "dark.xtc2", tmp_path / f"{det}.h5")
        a = Constants.load(d / "constants.h5", det)
        b = Constants.load(tmp_path / f"{det}.h5", det)
        for field in ("pedestal", "rms", "gain", "offset", "status", "mask"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=field)
        assert (b.run_min, b.run_max) == (a.run_min, a.run_max)
        assert b.source == "dark run 1 (dark.xtc2)"


def test_publish_xtc2_through_the_services_equals_in_process(twins, tmp_path):
    from gpusmd.services.run import replay_via_services
    det = "epix10kquad"
    d = twins(det)
    write_config(d, det, CONFIGS[det])
    replay(d / "run.h5", load_config(d / "run.yaml"), tmp_path / "in_process.h5", CPU,
           progress=False)
    summary = replay_via_services(d / "run.xtc2", d / "run.yaml", tmp_path / "services.h5",
                                  n_workers=1, backend="cpu", timeout=120,
                                  log_dir=tmp_path / "logs")
    assert summary.n_events == 6
    assert_same_datasets(tmp_path / "in_process.h5", tmp_path / "services.h5")


# ---- psana's det.raw.calib is the reference ------------------------------------------------
def gpusmd_calib(d, det, common_mode):
    """gpusmd's calibrated frames of run.xtc2, the mask psana applies (pixel status)."""
    config = write_config(d, det, f"""\
        detectors:
          DET:
            calib: constants.h5
            common_mode: {common_mode}
            mask: status
        """)
    out = []
    with open_run(d / "run.xtc2") as run:
        procs = build_processors(config, RunInfo.from_run(run), CPU)
        for b in run.batches(4, one_step=True):
            procs[det].process(b.frames[det], int(b.steps[det][0]))
            out.append(np.asarray(procs[det].last_calib))
    return np.concatenate(out)


def psana_calib(d, det, **kwargs):
    """psana's det.raw.calib of every event of run.xtc2, with gpusmd's constants."""
    ds = DataSource(files=str(d / "run.xtc2"), skip_calib_load="all")
    run = next(ds.runs())
    run._calib_const[det] = to_psana(Constants.load(d / "constants.h5", det), det, "sim",
                                     run.runnum)
    run.dsparms.calibconst = run._calib_const
    pdet = run.Detector(det)
    return np.stack([pdet.raw.calib(evt, **kwargs) for evt in run.events()])


# psana's Jungfrau calib defaults to its C++ version 3, which applies no common mode at
# all: the comparisons with common mode take its Python version (cversion=0).
CALIB_CASES = [
    ("epix10kquad", 0, {}), ("epix10kquad", [7, 1, 100, 10], {}),
    ("epix10kquad", [7, 2, 100, 10], {}), ("epix10kquad", [7, 3, 100, 10], {}),
    ("jungfrau1M", 0, {"cversion": 0}), ("jungfrau1M", [7, 1, 10, 10], {"cversion": 0}),
    ("jungfrau1M", [7, 2, 10, 10], {"cversion": 0}), ("jungfrau1M", [7, 3, 10, 10], {"cversion": 0}),
    ("epix100", 0, {}),
]


@pytest.mark.parametrize("det,cm,kw", CALIB_CASES, ids=[f"{d}-{c}" for d, c, _ in CALIB_CASES])
def test_calibration_equals_psana_det_raw_calib(twins, det, cm, kw):
    d = twins(det)
    ours = gpusmd_calib(d, det, cm)
    theirs = psana_calib(d, det, cmpars=tuple(cm) if cm else None, **kw)
    assert theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))
    if cm:          # the common mode did something: the check can tell it from none
        assert not np.array_equal(theirs, psana_calib(d, det, cmpars=None, **kw))


def test_epix10ka_gain_ranges_equal_psanas(tmp_path):
    """Per-ASIC trbit and pixel configurations that differ between the four ASICs of a
    panel, written in psana's ASIC order: gpusmd's gain range of every pixel (data with
    and without the switch bit) is psana's."""
    from gpusmd.detectors import get_detector
    from gpusmd.io.raw import RawRun
    from psana.detector.UtilsEpix10ka import map_gain_range_index
    det = "epix10kquad"
    raw = simulate_run(tmp_path / "run.h5", det, n_events=2, seed=9)
    rng = np.random.default_rng(4)
    import h5py
    with h5py.File(raw, "a") as f:
        f[f"{det}/config/pixel_config"][0] = rng.choice([0, 4, 8, 12], (4, 352, 384)).astype(np.uint8)
        f[f"{det}/config/trbit"][0] = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0],
                                                [0, 0, 1, 1]], np.uint8)
        frames = f[f"{det}/raw"]
        frames[1] = frames[1] | (rng.random((4, 352, 384)) < 0.5).astype(np.uint16) << 14
    write_xtc2(raw, tmp_path / "run.xtc2")
    model = get_detector(det)
    with RawRun(raw) as r, open_run(tmp_path / "run.xtc2") as p:
        cb = p.control_bits(det, 0)
        np.testing.assert_array_equal(cb, r.control_bits(det, 0))
        ds = DataSource(files=str(tmp_path / "run.xtc2"), skip_calib_load="all")
        run = next(ds.runs())
        pdet = run.Detector(det)
        for i, evt in enumerate(run.events()):
            ours = model.gain_index(r.read(det, i, i + 1)[0], cb)
            ours = np.where(ours < 0, 10, ours)         # psana's "no range" is 10, gpusmd's -1
            theirs = map_gain_range_index(pdet.raw, evt)
            np.testing.assert_array_equal(ours, np.asarray(theirs).reshape(ours.shape))
            assert len(np.unique(ours)) >= 4


# ---- bad sources -----------------------------------------------------------------------------
def test_bad_psana_sources_fail_in_one_line_before_any_output(twins, tmp_path):
    """replay, dark and publish: rc 2, one line naming the source (and the detector),
    nothing on stdout (psana's C++ prints its read errors there), no file made. The CLI
    runs go in parallel (psana sleeps a second on a bad datagram)."""
    d = twins("epix100")
    write_config(d, "epix100", CONFIGS["epix100"])
    (d / "other.yaml").write_text("detectors:\n  jungfrau9:\n    calib: constants.h5\n")
    missing, garbage = tmp_path / "missing.xtc2", tmp_path / "garbage.xtc2"
    empty, cut = tmp_path / "empty.xtc2", tmp_path / "cut.xtc2"
    garbage.write_bytes(b"not an xtc2 file" * 100)
    empty.write_bytes(b"")
    cut.write_bytes((d / "run.xtc2").read_bytes()[:10])      # inside its first header
    shmem = f"shmem=gpusmd_absent_{os.getpid()}"
    unreadable = "psana cannot read it: no XTC2 datagram at its start"
    cfg, out = ["--config", d / "run.yaml"], ["-o", tmp_path / "out.h5"]
    cases = [(["replay", missing, *cfg, *out], "XTC2 file not found"),
             (["replay", garbage, *cfg, *out], unreadable),
             (["replay", "exp=xpp:runs=3", *cfg, *out], "not a psana source"),
             (["replay", "exp=xpp:run=x", *cfg, *out], "is not a number"),
             (["replay", shmem, *cfg, *out],
              f"no DAQ shared memory 'gpusmd_absent_{os.getpid()}' on this host"),
             (["dark", missing, *out], "XTC2 file not found"),
             (["dark", empty, *out], "psana cannot read it: the file is empty"),
             (["publish", missing, *cfg], "XTC2 file not found"),
             (["publish", cut, *cfg], unreadable)]
    # a detector the run lacks: the error names the source and the detector
    lacks = [d / "run.xtc2", "--config", d / "other.yaml"]
    cases += [(["replay", *lacks, *out], "no detector 'jungfrau9'"),
              (["publish", *lacks], "no detector 'jungfrau9'")]
    before = sorted(tmp_path.iterdir())
    procs = [subprocess.Popen([sys.executable, "-m", "gpusmd.cli", *map(str, args)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args, _ in cases]
    try:
        for (args, message), p in zip(cases, procs):
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 2, (args, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("gpusmd: error: "), (args, stderr)
            assert str(args[1]) in lines[0] and message in lines[0], lines[0]
            assert "'Logger' object" not in lines[0], lines[0]
            if "jungfrau9" in message:
                assert "epix100" in lines[0], lines[0]          # what the run has
            assert stdout == "", (args, stdout)
    finally:
        for p in procs:              # psana waiting for a DAQ ignores SIGTERM
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(tmp_path.iterdir()) == before                # no output file
    (tmp_path / "empty").mkdir()
    with pytest.raises(RawFileError, match="no .xtc2 files"):
        open_run(tmp_path / "empty")


def test_a_run_cut_short_is_said_and_recorded(twins, tmp_path, caplog, capfd):
    """An XTC2 file cut inside an event: psana ends the run there as if it were whole
    (printing its read error on stdout); the replay has an /errors row and a warning."""
    import ctypes
    import h5py
    det = "epix100"
    d = twins(det)
    config = write_config(d, det, CONFIGS[det])
    data = (d / "run.xtc2").read_bytes()
    (tmp_path / "cut.xtc2").write_bytes(data[:len(data) * 2 // 3])
    caplog.set_level(logging.WARNING, logger="gpusmd.psana")
    s = replay(tmp_path / "cut.xtc2", config, tmp_path / "out.h5", CPU, progress=False)
    assert s.n_events == 3
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)       # what C's stdio holds back, out to fd 1 now
    assert capfd.readouterr().out == ""
    warned = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert len(warned) == 1 and "cut.xtc2" in warned[0] and "after 3 events" in warned[0]
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f["errors/event_id"][:].tolist() == [-1]
        assert f["errors/stage"][:].tolist() == [b"read"]
        reason = f["errors/reason"][0].decode()
        assert "datagram read error after 3 events" in reason and "cut short" in reason
        assert f.attrs["n_errors"] == 1


# ---- a live source: shmem=NAME ---------------------------------------------------------------
def posix_queue(name):
    """A POSIX message queue ``name`` for the time of a with block (a stand-in DAQ's)."""
    import contextlib
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mq_open.restype = ctypes.c_int
    libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

    @contextlib.contextmanager
    def made():
        fd = libc.mq_open(name.encode(), os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600, None)
        assert fd != -1, os.strerror(ctypes.get_errno())
        try:
            yield
        finally:
            libc.mq_close(fd)
            libc.mq_unlink(name.encode())
    return made()


def test_shmem_source_asks_psana_for_the_daq_or_refuses_at_once():
    """shmem=NAME: psana waits forever (in C, deaf to Ctrl-C) for the DAQ monitor's
    discovery queue; without it the source is refused before psana is asked; with it
    psana gets shmem=NAME and no calibration load, and the run is live."""
    from types import SimpleNamespace
    from gpusmd.io.psana_run import PsanaRun, daq_queue, daq_queue_exists
    name = f"gpusmd_test_{os.getpid()}"
    asked = []

    def datasource(**kwargs):
        asked.append(kwargs)
        run = SimpleNamespace(runnum=7, expt="xpp1234", detinfo={}, configs=[])
        return SimpleNamespace(runs=lambda: iter([run]))

    assert daq_queue_exists(name) is False
    with pytest.raises(RawFileError) as e:
        PsanaRun(f"shmem={name}", open_datasource=datasource)
    assert str(e.value) == (f"shmem={name}: no DAQ shared memory '{name}' on this host (no "
                            f"/PdsFromMonitorDiscovery_{name} queue): is the DAQ's monitor "
                            f"running?")
    assert asked == []
    with posix_queue(daq_queue(name)):
        assert daq_queue_exists(name) is True
        run = PsanaRun(f"shmem={name}", open_datasource=datasource)
    assert asked == [{"shmem": name, "skip_calib_load": "all"}]
    assert run.live and (run.run, run.experiment, run.name) == (7, "xpp1234", f"shmem={name}")
    assert run.detectors == {} and run.scalar_dtypes == {}
    # the queue checked is the one psana's shmem client waits for (its test time-out ends
    # the wait after a second)
    r = subprocess.run([sys.executable, "-c", "from psana import DataSource\n"
                        f"try: DataSource(shmem={name!r}, skip_calib_load='all')\n"
                        "except Exception: pass"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PSANA_TESTS_SHMEM_TMO": "1"})
    assert f"Waiting for queue {daq_queue(name)} to appear" in r.stdout, r.stdout + r.stderr


# ---- psana's constants where the config names none -------------------------------------------
def test_psana_run_without_calib_takes_psanas_constants(twins, tmp_path, monkeypatch):
    """No ``calib:`` for a detector of a psana run: its constants are psana's (here a
    stand-in for the database answering with the constants of constants.h5), and the file
    equals the replay with the constants file."""
    import gpusmd.calib.psana_constants as pc
    det = "epix10kquad"
    d = twins(det)
    config = write_config(d, det, CONFIGS[det])
    replay(d / "run.xtc2", config, tmp_path / "with_file.h5", CPU, progress=False)
    asked = []

    def database(source, detname, model=None, **kw):
        asked.append((str(source), detname))
        return pc.from_psana(to_psana(Constants.load(d / "constants.h5", det), det), model)

    monkeypatch.setattr(pc, "from_run", database)
    no_calib = write_config(tmp_path, det, "".join(
        line for line in CONFIGS[det].splitlines(keepends=True) if "calib:" not in line))
    assert no_calib.detectors[det].calib is None
    replay(d / "run.xtc2", no_calib, tmp_path / "from_db.h5", CPU, progress=False)
    assert asked == [(str(d / "run.xtc2"), det)]
    assert_same_datasets(tmp_path / "with_file.h5", tmp_path / "from_db.h5",
                         skip=(f"UserDataCfg/{det}/constants_",))
    import h5py
    with h5py.File(tmp_path / "from_db.h5", "r") as f:
        assert f[f"UserDataCfg/{det}/constants_source"][()].decode() == f"psana {det}"


def test_psana_run_without_calib_and_no_database_fails_before_output(twins, tmp_path):
    det = "epix100"
    d = twins(det)
    (tmp_path / "run.yaml").write_text(f"detectors:\n  {det}:\n    common_mode: 0\n")
    r = subprocess.run([sys.executable, "-m", "gpusmd.cli", "replay", str(d / "run.xtc2"),
                        "--config", "run.yaml", "-o", "out.h5"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "GPUSMD_OFFLINE": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "run.xtc2" in lines[0] and repr(det) in lines[0], r.stderr
    assert "calibration database" in lines[0]
    assert not (tmp_path / "out.h5").exists()
