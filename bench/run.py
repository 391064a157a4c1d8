"""The standard benchmark recipes of DESIGN §12 on one backend, with the references
measured in the same run.

    python bench/run.py [--backend cpu|gpu|auto] [--recipes R1 R2 R3] [--events N]
                        [--threads 1 N ...] [--no-tests]

(--backend: default $GPUSMD_BACKEND, else auto. --threads: on the CPU, the thread counts
of gpusmd's CPU engine to run each recipe with; default 1 (per core) and every core.)

R1: epix10k2M, calibration + common mode 85 + 4 ROIs + 2 projections + azimuthal
    integration (500 q bins x 1 and x 16 phi, polarization + solid angle) + sums.
R2: Jungfrau 4M, calibration + common mode 7 + the same features.
R3: epix100, droplets + photons.

For each recipe (on the CPU: at each thread count): events/s per stage (calibration
without and with common mode, each function, the sums) and end to end, GB/s of raw
input; beside them the references: where psana is installed, psana's own calibration
without common mode and with the recipe's (det.raw.calib of the recipe's run written as
XTC2, with the same constants: R1 cmpars (7,3,100,10), R2 cversion 0 and (7,3,10,10);
bench/psana_reference.py, on --psana-events events after a first one; one process, and
for N threads that rate x N, psana's ideal scaling over N processes), the project's
psana-style NumPy loops (bench/psana_style.py), pyFAI's integrate1d (CSR) on a frame of
the same size on as many OpenMP threads, and on a GPU the pinned host-to-device copy
bound for the raw bytes of an event. On a GPU the whole test suite runs first with the CuPy backend
(GPUSMD_BACKEND=gpu; its summary in bench/results/tests-gpu.txt and in the results'
notes; a failure is reported and the benchmark still runs); the results go to
bench/results/recipes-<backend>.{json,md}, written again after each recipe (a run
stopped half way keeps the recipes done). A recipe that fails is a row saying so; a
reference that is not installed (psana, pyFAI) is left out.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402
from psana_reference import PSANA_CALIB  # noqa: E402

from gpusmd.backend import get_backend  # noqa: E402
from gpusmd.calib.dark import process_dark  # noqa: E402
from gpusmd.config import load_config  # noqa: E402
from gpusmd.cpu_engine import engine_label, set_threads, usable_cores  # noqa: E402
from gpusmd.errors import GpusmdError  # noqa: E402
from gpusmd.io.raw import RawRun  # noqa: E402
from gpusmd.processor import DetectorProcessor  # noqa: E402
from gpusmd.simulate import simulate_run  # noqa: E402

HAVE_PSANA = importlib.util.find_spec("psana") is not None
HAVE_PYFAI = importlib.util.find_spec("pyFAI") is not None

AZAV = "{kind: azav, name: %s, center: [0.0, 0.0], dis_to_sam: 80.0, eBeam: 9.5, qedges: %s, phiBins: %d}"
FEATURES_R12 = """\
- {kind: roi, name: ROI_0, bounds: %(b0)s}
- {kind: roi, name: ROI_1, bounds: %(b1)s}
- {kind: roi, name: ROI_2, bounds: %(b2)s, thresADU: [2.0, null]}
- {kind: roi, name: ROI_3, bounds: %(b3)s}
- {kind: projection, parent: ROI_0, axis: -1}
- {kind: projection, parent: ROI_1, axis: -2, mean: true}
- %(azav1)s
- %(azav16)s
"""
RECIPES = {
    "R1": ("epix10k2M", 85, 16),
    "R2": ("jungfrau4M", 7, 8),
    "R3": ("epix100", 46, 64),
}


def rois(model):
    nseg, rows, cols = model.seg_shape
    s = lambda k: [[k, k + 1]] if model.segmented else []  # noqa: E731
    return {f"b{i}": s(i) + [[rows // 4, rows // 2], [cols // 4, 3 * cols // 4]] for i in range(4)}


def config_text(recipe, model, code):
    if recipe == "R3":
        functions = textwrap.dedent("""\
            - {kind: droplet, threshold: 5, thresholdLow: 3, thresADU: 50}
            - {kind: droplet2photons, parent: droplet, aduspphot: 150}
            - {kind: photons, ADU_per_photon: 150}
            """)
    else:
        edges = np.linspace(0.05, 3.0, 501).round(6).tolist()
        functions = FEATURES_R12 % {**rois(model), "azav1": AZAV % ("azav_q", edges, 1),
                                    "azav16": AZAV % ("azav_phi", edges, 16)}
    return (f"detectors:\n  {model.type}:\n    calib: constants.h5\n    common_mode: {code}\n"
            f"    functions:\n" + textwrap.indent(functions, " " * 6)
            + "    sums: [calib, calib_max]\n")


def sync(backend):
    if backend.is_gpu:
        backend.xp.cuda.Device().synchronize()


def timed(backend, fn, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync(backend)
        t0 = time.perf_counter()
        fn()
        sync(backend)
        best = min(best, time.perf_counter() - t0)
    return best


def run_recipe(recipe, backend, n_events, workdir: Path, psana_events: int,
               threads: int | None = None, refs: dict | None = None):
    """The rows of one recipe; ``threads``: the CPU engine's (None on a GPU); ``refs``:
    the reference rates measured so far (each is measured once, kept there)."""
    refs = {} if refs is None else refs
    scale = threads or 1                # psana: one process, scaled ideally to N cores
    det, code, default_events = RECIPES[recipe]
    n = n_events or default_events
    d = workdir / recipe
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "run.h5").exists():
        simulate_run(d / "dark.h5", det, n_events=5, dark=True, run=1)
        process_dark(d / "dark.h5", d / "constants.h5")
        simulate_run(d / "run.h5", det, n_events=n, run=2)
    with RawRun(d / "run.h5") as run:
        model = run.detectors[det]
        raw = run.read(det, 0, n)
        cb = run.control_bits(det, 0)
    (d / "run.yaml").write_text(config_text(recipe, model, code))
    cfg = load_config(d / "run.yaml").detectors[det]
    proc = DetectorProcessor(cfg, model, backend, 2)
    plain = DetectorProcessor(dataclasses.replace(cfg, common_mode=0, functions=[]), model,
                              backend, 2)
    for p in (proc, plain):
        p.set_control_bits(0, cb)
    batch = backend.asarray(raw)
    proc.process(batch[:2])                         # per-run tables and maps
    plain.process(batch[:2])
    rows = []
    gb = model.raw_nbytes / 1e9
    on = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "GPU"

    def add(stage, seconds, reference=None, ref_rate=None):
        rate = n / seconds
        rows.append([recipe, stage, on, f"{rate:.1f}", f"{rate * gb:.2f}",
                     reference or "", f"{ref_rate:.2f}" if ref_rate else "",
                     f"{rate / ref_rate:.2f}" if ref_rate else ""])

    def psana(key, kwargs):
        """psana's det.raw.calib with kwargs: (label, rate scaled to the threads)."""
        if key not in refs:
            refs[key] = psana_calib_rate(d, det, psana_events, kwargs)
        label = f"psana det.raw.calib({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        return (label if scale == 1 else f"{label} x {scale} processes (ideal)"), refs[key] * scale

    seconds = timed(backend, lambda: plain.calibrate(batch)[0])
    add("calibration, no common mode", seconds, *(psana((recipe, "none"), {"cmpars": None})
                                                  if HAVE_PSANA else ()))

    def calibrate():
        return proc.calibrate(batch)[0]

    stage, seconds = "calibration + common mode %s" % code, timed(backend, calibrate)
    if recipe == "R3":
        add(stage, seconds)
    else:
        if HAVE_PSANA:
            add(stage, seconds, *psana((recipe, "cm"), PSANA_CALIB[model.family]))
        if (recipe, "style") not in refs:
            refs[recipe, "style"] = psana_style_rate(model, cfg, proc, raw[:psana_events], cb)
        add(stage, seconds, "project's psana-style NumPy loops, one process" if scale == 1
            else f"project's psana-style NumPy loops x {scale} processes (ideal)",
            refs[recipe, "style"] * scale)
    calib = calibrate()
    for feature in proc.features:
        parent = proc.parents.get(feature.name)
        data = calib if parent is None else parent.child_data
        ref = ref_rate = None
        if feature.kind == "azav" and feature.nphi == 1 and HAVE_PYFAI:
            t = threads or 1
            ref = f"pyFAI integrate1d (CSR), same size, {t} OpenMP thread{'s' if t > 1 else ''}"
            ref_rate = pyfai_rate_on(model.npix, feature.nq, t)
        add(f"{feature.kind} {feature.name}", timed(backend, lambda: feature.process(data)),
            ref, ref_rate)
    add("sums", timed(backend, lambda: proc.sums.update(calib)))
    add("end to end (from host raw)", timed(backend, lambda: proc.process(raw)))
    if backend.is_gpu:
        bound = h2d_rate(backend, raw)
        rows[-1][4:] = ["pinned host-to-device copy bound", f"{bound:.1f}",
                        f"{(n / timed(backend, lambda: proc.process(raw))) / bound:.2f}"]
    return rows


def psana_calib_rate(d: Path, det: str, n_events: int, kwargs: dict) -> float:
    """psana's det.raw.calib(**kwargs) on the recipe's run written as XTC2
    (bench/psana_reference.py): events/s over n_events after the first."""
    from psana_reference import psana_calib_pass
    from gpusmd.io.xtc2 import write_xtc2
    if not (d / "run.xtc2").exists():
        write_xtc2(d / "run.h5", d / "run.xtc2")
    seconds, _, _ = psana_calib_pass(d / "run.xtc2", d / "constants.h5", det, n_events + 1, **kwargs)
    return 1 / seconds


def psana_version() -> str:
    if not HAVE_PSANA:
        return "not installed"
    from psana_reference import psana_version
    return psana_version()


def psana_style_rate(model, cfg, proc, raw, cb):
    from psana_style import calibrate_event, cm_mode7_event
    from gpusmd.calib.common_mode import CM_GAIN_RANGES
    c, mask = proc.constants, proc.masks[cfg.mask]
    gi = model.gain_index(raw, cb)
    allowed = np.isin(gi, CM_GAIN_RANGES[model.family]) & (mask != 0)
    t0 = time.perf_counter()
    for e in range(len(raw)):
        adu, factor = calibrate_event(raw[e], gi[e], c.pedestal, c.gain, mask)
        cm_mode7_event(adu, allowed[e], model.family, *proc.cmpars[1:4])
        adu * factor
    return len(raw) / (time.perf_counter() - t0)


def pyfai_rate_on(npix: int, nq: int, threads: int) -> float:
    """pyfai_rate in a fresh process on ``threads`` OpenMP threads (OpenMP reads its
    thread count once, at start)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from run import pyfai_rate; print(pyfai_rate({npix}, {nq}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True)
    return float(done.stdout.split()[-1])


def pyfai_rate(npix: int, nq: int, n=4):
    """pyFAI integrate1d (no splitting, CSR, cython) events/s on random frames of
    npix pixels, 1536 columns."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    rows = npix // 1536
    p = 100e-6
    ai = AzimuthalIntegrator(dist=0.08, poni1=rows * p / 2, poni2=1536 * p / 2,
                             detector=Detector(p, p, max_shape=(rows, 1536)),
                             wavelength=12.3984 / 9.5 * 1e-10)
    frames = np.random.default_rng(0).gamma(2, 5, (n, rows, 1536)).astype(np.float32)
    kw = dict(npt=nq, unit="q_A^-1", correctSolidAngle=True, polarization_factor=1.0,
              method=("no", "csr", "cython"))
    ai.integrate1d(frames[0], **kw)
    t0 = time.perf_counter()
    for f in frames:
        ai.integrate1d(f, **kw)
    return n / (time.perf_counter() - t0)


def h2d_rate(backend, raw) -> float:
    """Events/s that pinned host-to-device copies of the raw frames allow."""
    cupy = backend.xp
    pinned = cupy.cuda.alloc_pinned_memory(raw.nbytes)
    host = np.frombuffer(pinned, raw.dtype, raw.size).reshape(raw.shape)
    host[...] = raw
    dev = cupy.empty_like(host)
    seconds = timed(backend, lambda: dev.set(host), repeat=5)
    return len(raw) / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("auto", "cpu", "gpu"), default=None,
                   help="default: $GPUSMD_BACKEND, else auto")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--events", type=int, default=None, help="events per recipe")
    p.add_argument("--psana-events", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="on the CPU: the CPU engine's thread counts (default 1 and every core)")
    p.add_argument("--no-tests", action="store_true", help="on a GPU: skip the test suite")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    try:
        backend = get_backend(args.backend)
    except GpusmdError as e:
        sys.exit(f"bench/run.py: {e}")
    tests = ""
    if backend.is_gpu and not args.no_tests:
        tests = run_tests_on_gpu()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-recipes-"))
    columns = ["recipe", "stage", "gpusmd on", "events/s", "GB/s raw", "reference",
               "reference events/s", "ratio"]
    rows = []
    if backend.is_gpu:
        thread_counts = [None]
    else:
        thread_counts = sorted(set(args.threads or [1, usable_cores()]))
    device = (f"CPU, one process, {engine_label(backend.cpu_engine).split(',')[0]} engine"
              if not backend.is_gpu else gpu_name(backend))
    for recipe in args.recipes:
        refs = {}
        for threads in thread_counts:
            if threads:
                set_threads(threads)
            try:
                rows += run_recipe(recipe, backend, args.events, workdir, args.psana_events,
                                   threads, refs)
            except Exception as e:      # the other recipes still give their numbers
                print(f"{recipe} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                rows.append([recipe, f"FAILED: {type(e).__name__}: {e}", "", "", "", "", "", ""])
        print_table(columns, rows)
        md = write_results(f"recipes-{backend.name}", f"Recipes {' '.join(args.recipes)} on "
                           f"the {backend.name} backend ({device})", columns, rows,
                           notes=f"`python bench/run.py --backend {backend.name}`; best of 3 per "
                           "stage, batches of all the recipe's events at once; on the CPU each "
                           f"recipe on {', '.join(map(str, thread_counts))} thread(s) of the "
                           "CPU engine. References: "
                           f"psana's det.raw.calib (psana {psana_version()}) and the "
                           f"psana-style loops on {args.psana_events} events (psana's after a "
                           "first one, where it builds its caches); pyFAI "
                           f"({'installed' if HAVE_PYFAI else 'not installed'}); "
                           "bench/psana_reference.py compares with psana in more detail."
                           + tests)
    print(f"wrote {md}")


def run_tests_on_gpu() -> str:
    """The whole test suite with the CuPy backend; its summary goes to
    bench/results/tests-gpu.txt and into the results' notes. A failure is reported, not
    fatal: the benchmark still runs, its numbers are worth having either way."""
    root = Path(__file__).parents[1]
    print("running the test suite with the CuPy backend first", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", str(root / "tests")],
                          env={**os.environ, "GPUSMD_BACKEND": "gpu"}, cwd=root,
                          capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    out = root / "bench" / "results" / "tests-gpu.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(proc.stdout[-200000:])
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    if proc.returncode != 0:
        print(f"THE TEST SUITE FAILED ON THE GPU (status {proc.returncode}): see {out}",
              file=sys.stderr, flush=True)
        return f" Test suite on this GPU FAILED: {summary} (bench/results/tests-gpu.txt)."
    return f" Test suite on this GPU: {summary}."


def gpu_name(backend) -> str:
    props = backend.xp.cuda.runtime.getDeviceProperties(backend.xp.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


if __name__ == "__main__":
    main()
