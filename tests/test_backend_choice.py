"""Which backend runs: --backend > $GPUSMD_BACKEND > the config's > auto, and auto's
device check (a GPU that CuPy sees but cannot compile for gives the CPU and one
warning). CuPy is replaced by a fake module: these tests need no GPU and run the same
on one."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import h5py
import pytest

from gpusmd import backend as backend_mod
from gpusmd.backend import BackendFallbackWarning, backend_name, get_backend
from gpusmd.errors import GpusmdError

ROOT = Path(__file__).resolve().parents[1]

# a CuPy that sees one device; FAKE_CUPY=fail: NVRTC refuses every kernel (as a CuPy
# built for another CUDA major version does), FAKE_CUPY=ok: the probe kernel "runs"
FAKE_CUPY = textwrap.dedent('''\
    """A stand-in for CuPy: one device, kernels compile or not after $FAKE_CUPY."""
    import os
    import types

    import numpy as np

    float32 = np.float32
    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))


    class CompileException(Exception):
        pass


    class RawModule:
        def __init__(self, code, options=(), backend="nvrtc"):
            self.code = code

        def get_function(self, name):
            if os.environ.get("FAKE_CUPY", "fail") != "ok":
                raise CompileException("nvrtc: error: invalid value for --gpu-architecture")

            def launch(grid, block, args):
                out, n = args
                out[:int(n)] = 2 * np.arange(int(n), dtype=np.float32) + 1
            return launch


    def full(n, value, dtype=None):
        return np.full(n, value, dtype)


    def asnumpy(a):
        return np.asarray(a)
    ''')


@pytest.fixture
def fake_cupy(tmp_path, monkeypatch):
    """Installs the fake CuPy in this process (and on PYTHONPATH for subprocesses);
    yields the folder holding it. The real probe is forgotten before and after."""
    folder = tmp_path / "fake"
    (folder / "cupy").mkdir(parents=True)
    (folder / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    monkeypatch.syspath_prepend(str(folder))
    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv("GPUSMD_BACKEND", raising=False)
    backend_mod._forget_probe()
    yield folder
    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        sys.modules.pop(name)
    backend_mod._forget_probe()


def test_precedence_command_line_then_environment_then_config(monkeypatch):
    monkeypatch.delenv("GPUSMD_BACKEND", raising=False)
    assert backend_name() == "auto"
    assert backend_name(config="gpu") == "gpu"
    monkeypatch.setenv("GPUSMD_BACKEND", "cpu")
    assert backend_name(config="gpu") == "cpu"
    assert backend_name(config="auto") == "cpu"
    assert backend_name("gpu", config="auto") == "gpu"
    assert get_backend(config="gpu").name == "cpu"
    monkeypatch.setenv("GPUSMD_BACKEND", "")       # empty: as if unset
    assert backend_name(config="cpu") == "cpu"
    monkeypatch.setenv("GPUSMD_BACKEND", "cuda")
    with pytest.raises(GpusmdError, match="unknown backend 'cuda' .GPUSMD_BACKEND."):
        backend_name()


def test_auto_falls_back_with_one_warning_when_cupy_cannot_compile(fake_cupy, monkeypatch):
    monkeypatch.setenv("FAKE_CUPY", "fail")
    monkeypatch.setattr(backend_mod, "driver_cuda_major", lambda: 13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = get_backend("auto"), get_backend()
    assert first.name == second.name == "cpu"
    fallbacks = [w for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "using the CPU" in message and "cannot compile and run a kernel" in message
    assert "invalid value for --gpu-architecture" in message      # CuPy's own reason
    assert "the driver supports CUDA 13" in message and "'gpusmd[gpu-cuda13]'" in message
    with pytest.raises(GpusmdError, match="backend 'gpu' asked for, but CuPy sees 1 CUDA"):
        get_backend("gpu")


def test_auto_takes_a_gpu_that_runs_the_probe(fake_cupy, monkeypatch):
    monkeypatch.setenv("FAKE_CUPY", "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = get_backend("auto")
    assert b.name == "gpu" and b.xp.__name__ == "cupy"
    monkeypatch.setenv("GPUSMD_BACKEND", "cpu")
    assert get_backend(config="gpu").name == "cpu"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from gpusmd.calib.dark import process_dark
    from gpusmd.simulate import simulate_run
    d = tmp_path_factory.mktemp("backend_choice")
    simulate_run(d / "dark.h5", "camera", n_events=4, dark=True, run=1, shape=(16, 16))
    simulate_run(d / "run.h5", "camera", n_events=4, run=2, shape=(16, 16))
    process_dark(d / "dark.h5", d / "constants.h5")
    (d / "run.yaml").write_text(textwrap.dedent("""\
        detectors:
          camera:
            calib: constants.h5
            functions:
              - {kind: roi, bounds: [[0, 8], [0, 8]]}
        """))
    return d


def replay_cli(d, out, fake_folder, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "GPUSMD_BACKEND"}, **env,
           "PYTHONPATH": os.pathsep.join([str(fake_folder), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "gpusmd", "replay", "run.h5", "--config",
                        "run.yaml", "-o", out, "-q"], cwd=d, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with h5py.File(d / out, "r") as f:
        return f.attrs["backend"], r


def test_environment_cpu_wins_over_a_gpu_that_auto_would_take(small_run, fake_cupy):
    backend, r = replay_cli(small_run, "env_cpu.h5", fake_cupy, GPUSMD_BACKEND="cpu",
                            FAKE_CUPY="ok")
    assert backend == "cpu" and "backend cpu" in r.stdout
    assert "warning: backend" not in r.stderr     # (a CPU engine's fallback may say its own)


def test_replay_auto_falls_back_to_the_cpu_in_one_line(small_run, fake_cupy):
    backend, r = replay_cli(small_run, "auto.h5", fake_cupy, FAKE_CUPY="fail")
    assert backend == "cpu"
    lines = [line for line in r.stderr.splitlines() if "warning: backend" in line]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gpusmd: warning: backend auto: using the CPU: CuPy sees 1")
