"""The MPI commands under mpiexec (the mpich wheel's). ``replay --mpi``: three ranks give
the file of a one-process replay, dataset by dataset (event ids, features, droplets,
errors, the sums bit for bit), for a raw HDF5 run and the same run as psana XTC2; the
run file's per-event datasets are virtual over the parts and read with plain h5py; a
rank that fails or is killed ends the job, named, with no complete-looking run file.
``dark --mpi`` gives the constants of one process bit for bit (raw and XTC2 dark runs);
``cube --mpi`` the cube of one process (the images to float64 rounding)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpusmd.calib.dark import process_dark
from gpusmd.io.compare import diff_files, read_datasets
from gpusmd.io.output import is_complete, open_written
from gpusmd.io.xtc2 import write_xtc2
from gpusmd.mpi import pick_device, rank_blocks

from conftest import dark_and_run

DET = "jungfrau05M"
N_EVENTS = 14
CONFIG = f"""\
    batch_size: 4
    experiment: xpp00123
    detectors:
      {DET}:
        calib: constants.h5
        functions:
          - {{kind: roi, bounds: [[0, 1], [10, 300], [20, 600]]}}
          - {{kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, eBeam: 9.5, qbin: 0.02, phiBins: 2}}
          - {{kind: droplet, threshold: 5}}
        sums: [calib, calib_square, calib_max, calib_thresADU5]
    """
FAULT = '''\
import os, signal
def fault(frames, how, rank):
    if os.environ.get("PMI_RANK") == str(rank):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("a fault for the test")
    return {"ok": next(iter(frames.values())).sum(axis=(1, 2, 3))}
'''


def test_rank_blocks():
    # 14 events in batches of 4 (4 batches) over 3 ranks: whole batches, in order
    assert rank_blocks(14, 4, 3) == [(0, 4), (4, 8), (8, 14)]
    assert rank_blocks(8, 4, 1) == [(0, 8)]
    assert rank_blocks(5, 4, 3) == [(0, 0), (0, 4), (4, 5)]
    assert rank_blocks(0, 4, 2) == [(0, 0), (0, 0)]


def test_pick_device():
    env = {}
    assert pick_device(3, env, count=lambda: 4) == "3" and env == {"CUDA_VISIBLE_DEVICES": "3"}
    env = {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert pick_device(3, env, count=lambda: 8) == "5" and env["CUDA_VISIBLE_DEVICES"] == "5"
    env = {"CUDA_VISIBLE_DEVICES": "2"}            # the launcher gave one: left alone
    assert pick_device(1, env, count=lambda: 8) == "2" and env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {}
    assert pick_device(0, env, count=lambda: 0) is None and env == {}


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    assert found, "mpiexec is not installed (pip install mpich)"
    return found


def run(d, *args, n=3, timeout=180):
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "gpusmd", *map(str, args)]
    return subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(d), "GPUSMD_BACKEND": "cpu"})


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi")
    dark_and_run(d, DET, N_EVENTS, dark_events=4)
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG))
    (d / "mpifault.py").write_text(FAULT)
    return d


@pytest.mark.parametrize("form", ["h5", "xtc2"])
def test_three_ranks_give_the_one_process_file(d, form):
    source = d / f"run.{form}"
    if form == "xtc2":
        write_xtc2(d / "run.h5", source)
    one = subprocess.run([sys.executable, "-m", "gpusmd", "replay", source, "--config",
                          "run.yaml", "-o", f"one_{form}.h5", "-q", "--backend", "cpu"],
                         cwd=d, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    r = run(d, "replay", source, "--config", "run.yaml", "-o", f"mpi_{form}.h5", "-q", "--mpi")
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.count(f"{N_EVENTS} events in") == 1          # said by rank 0 only
    out = d / f"mpi_{form}.h5"
    assert diff_files(d / f"one_{form}.h5", out) == []
    assert is_complete(out)
    with h5py.File(out, "r") as f:
        assert f["event_id"].is_virtual and f[f"{DET}/ROI_0_sum"].is_virtual
        ids = f["event_id"][()].tolist()
        assert ids == sorted(ids) and len(set(ids)) == N_EVENTS
        assert f.attrs["mpi_ranks"] == 3 and f.attrs["n_events"] == N_EVENTS
        assert f.attrs["mpi_parts"] == f"mpi_{form}_parts"
    parts = sorted((d / f"mpi_{form}_parts").iterdir())
    assert [p.name for p in parts] == ["part0000.h5", "part0001.h5", "part0002.h5"]
    with h5py.File(parts[1], "r") as f:                 # rank 1: events 4-7
        assert f["event_id"][()].tolist() == ids[4:8] and f.attrs["complete"] == 1
    # the run file moves with its parts: read from elsewhere
    moved = d / f"moved_{form}"
    moved.mkdir()
    shutil.move(out, moved / out.name)
    shutil.move(d / f"mpi_{form}_parts", moved / f"mpi_{form}_parts")
    assert diff_files(d / f"one_{form}.h5", moved / out.name) == []
    # an existing run file is refused before any work, said once
    again = run(d, "replay", source, "--config", "run.yaml", "-o", moved / out.name, "-q",
                "--mpi")
    assert again.returncode != 0 and again.stderr.count("exists") == 1


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(d, how):
    (d / f"fault_{how}.yaml").write_text(textwrap.dedent(CONFIG) + textwrap.dedent(f"""\
        user_functions:
          - {{name: fault, function: "mpifault:fault", params: {{how: {how}, rank: 1}},
             detectors: [{DET}]}}
        """))
    r = run(d, "replay", "run.h5", "--config", f"fault_{how}.yaml", "-o", f"fault_{how}.h5",
            "-q", "--mpi")
    said = r.stdout + r.stderr
    assert r.returncode != 0
    assert said.count("rank 1 of 3 failed: events 4-7") == 1, said      # said by rank 0
    if how == "raise":
        assert "a fault for the test" in said
    else:                               # its work killed outright: the rank says so
        assert "killed by signal 9 (SIGKILL)" in said, said
    out = d / f"fault_{how}.h5"
    assert not is_complete(out)
    if out.exists():
        with open_written(out) as f:
            assert f.attrs["complete"] == 0 and "event_id" not in f


@pytest.mark.parametrize("form", ["h5", "xtc2"])
def test_dark_over_three_ranks(d, form):
    source = d / f"dark.{form}"
    if form == "xtc2":
        write_xtc2(d / "dark.h5", source)
    process_dark(source, d / f"dark_one_{form}.h5")
    r = run(d, "dark", source, "-o", f"dark_mpi_{form}.h5", "--mpi")
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.count("wrote") == 1                  # rank 0 writes and says so
    assert diff_files(d / f"dark_one_{form}.h5", d / f"dark_mpi_{form}.h5") == []
    again = run(d, "dark", source, "-o", f"dark_mpi_{form}.h5", "--mpi")
    assert again.returncode == 2 and again.stderr.count("exists") == 1


def test_cube_over_three_ranks(d):
    one = d / "cube_smd.h5"
    r = subprocess.run([sys.executable, "-m", "gpusmd", "replay", "run.h5", "--config",
                        "run.yaml", "-o", one, "-q", "--backend", "cpu"], cwd=d,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    args = ["cube", one, "--bin", "lightStatus/xray:0,1,2", "--raw", "run.h5", "--config",
            "run.yaml", "-q"]
    r1 = subprocess.run([sys.executable, "-m", "gpusmd", *map(str, args), "-o", "cube_one.h5",
                         "--backend", "cpu"], cwd=d, capture_output=True, text=True,
                        timeout=120)
    assert r1.returncode == 0, r1.stderr
    r3 = run(d, *args, "-o", "cube_mpi.h5", "--mpi")
    assert r3.returncode == 0, r3.stderr + r3.stdout
    a, b = read_datasets(d / "cube_one.h5"), read_datasets(d / "cube_mpi.h5")
    assert set(a) == set(b)
    images = [k for k in a if f"{DET}/calib" in k]
    assert images
    for k in a:
        if k in images:             # float64 sums added per rank: rounding only
            np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=1e-9, err_msg=k)
        else:                       # counts and the exact sums of the columns
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
