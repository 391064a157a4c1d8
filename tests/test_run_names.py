"""A run's small-data file is named as smalldata_tools names it, <experiment>_Run<NNNN>.h5,
when the output is a directory or not given (smalldata_tools' producer writes
'%s_Run%04d.h5' % (exp, run)); the config's experiment wins over the run's."""
import os
import subprocess
import sys
import textwrap

import h5py
import pytest

from gpusmd.config import load_config
from gpusmd.errors import GpusmdError
from gpusmd.io.output import run_output
from gpusmd.replay import replay
from gpusmd.simulate import simulate_run


def test_run_output_names(tmp_path):
    assert run_output(None, "xpptut15", 7) == run_output(None, "xpptut15", 7)
    assert str(run_output(None, "xpptut15", 7)) == "xpptut15_Run0007.h5"
    assert run_output(tmp_path, "mfx1", 12) == tmp_path / "mfx1_Run0012.h5"
    assert run_output(f"{tmp_path}/new/", "mfx1", 12) == tmp_path / "new" / "mfx1_Run0012.h5"
    assert run_output(tmp_path / "x.h5", "mfx1", 12) == tmp_path / "x.h5"
    assert run_output(tmp_path / "{experiment}-{run}.h5", "", 3) == tmp_path / "run-3.h5"
    with pytest.raises(GpusmdError, match=r"only \{experiment\} and \{run\}"):
        run_output(tmp_path / "{nope}.h5", "a", 1)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    simulate_run(d / "run.h5", "camera", n_events=4, shape=(32, 32), run=5, experiment="sim")
    for name, exp in (("named.yaml", "experiment: xcs1234\n"), ("plain.yaml", "")):
        (d / name).write_text(exp + textwrap.dedent("""\
            detectors:
              camera:
                functions:
                  - {kind: ROIFunc, ROI: [[0, 8], [0, 8]]}
            """))
    return d


def test_replay_into_a_directory_takes_the_config_experiment(d):
    out = d / "out"
    out.mkdir()
    summary = replay(d / "run.h5", load_config(d / "named.yaml"), out, progress=False)
    assert summary.output == out / "xcs1234_Run0005.h5"
    with h5py.File(summary.output, "r") as f:
        assert f.attrs["experiment"] == "xcs1234" and len(f["event_id"]) == 4
    with pytest.raises(GpusmdError, match="exists"):     # a finished file stays
        replay(d / "run.h5", load_config(d / "named.yaml"), out, progress=False)


def test_replay_without_output_names_the_file_from_the_run(d):
    work = d / "here"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "gpusmd.cli", "replay", str(d / "run.h5"),
                        "--config", str(d / "plain.yaml"), "-q"], cwd=work,
                       capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.listdir(work) == ["sim_Run0005.h5"]


def test_replay_via_services_names_the_file_and_keeps_a_finished_one(d):
    from gpusmd.services.run import replay_via_services
    out = d / "svc"
    out.mkdir()
    summary = replay_via_services(d / "run.h5", d / "named.yaml", out, 1, "cpu")
    assert summary.output == out / "xcs1234_Run0005.h5" and summary.n_events == 4
    with pytest.raises(GpusmdError, match="exists"):
        replay_via_services(d / "run.h5", d / "named.yaml", out, 1, "cpu")
