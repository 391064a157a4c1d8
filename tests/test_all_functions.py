"""Every function on two detectors: one config, in process and through the services;
the dataset names follow DESIGN §8-9 and variable-length records round-trip."""
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_same_datasets

from gpusmd.backend import get_backend
from gpusmd.calib.dark import process_dark
from gpusmd.config import load_config
from gpusmd.replay import replay
from gpusmd.services.run import replay_via_services
from gpusmd.simulate import simulate_run

N = 8
CONFIG = """\
    batch_size: 3
    detectors:
      jungfrau05M:
        calib: constants.h5
        common_mode: 7
        functions:
          - {kind: roi, name: ROI_0, bounds: [[0, 1], [100, 200], [300, 500]], thresADU: [1.0, null]}
          - {kind: projection, parent: ROI_0, axis: 1}
          - {kind: projection, parent: ROI_0, axis: 2, mean: true}
          - {kind: spectrum, bins: [-5, 50, 55]}
          - {kind: image, rebin: 4}
          - {kind: lineout, axis: 0, band: [200, 300]}
          - {kind: autocorr, roi: [[0, 1], [0, 128], [0, 128]], save_range: [5, 5]}
          - {kind: droplet, threshold: 5, thresholdLow: 3, thresADU: 5}
          - {kind: droplet2photons, threshold: 5, thresholdLow: 3, thresADU: 5, aduspphot: 9.0}
          - {kind: droplet2photons, parent: droplet, aduspphot: 9.0}
          - {kind: photons, ADU_per_photon: 9.0, nData: 50}
%(azav)s
%(sparsify)s
        sums: [calib, calib_max]
      epix100:
        calib: constants.h5
        common_mode: 46
        functions:
          - {kind: roi, bounds: [[0, 352], [0, 384]]}
          - {kind: droplet, threshold: 5, thresholdLow: 3, thresADU: 50, nData: 20}
        sums: [calib]
    user_functions:
      - {name: both, function: "gpusmd.examples:total_intensity", params: {threshold: 1.0}}
    """


def azav_line():
    from gpusmd.features import FEATURES
    if "azav" not in FEATURES:
        return ""
    return ("          - {kind: azav, center: [0.0, 0.0], dis_to_sam: 100.0, eBeam: 9.5, "
            "qbin: 0.01, phiBins: 4}")


def sparsify_line():
    # the services' workers are fresh processes: they know "sparsify" only once
    # gpusmd/features/__init__.py imports the module (then this condition always holds)
    import gpusmd.features
    if "sparsify" not in Path(gpusmd.features.__file__).read_text():
        return ""
    return ("          - {kind: sparsify, parent: ROI_0}\n"
            "          - {kind: sparsify, parent: ROI_0, nData: 30}")


@pytest.fixture(scope="module")
def two_detectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("allfunc")
    for det in ("jungfrau05M", "epix100"):
        simulate_run(d / f"dark_{det}.h5", det, n_events=10, dark=True, seed=5, run=1)
        process_dark(d / f"dark_{det}.h5", d / f"c_{det}.h5")
        simulate_run(d / f"run_{det}.h5", det, n_events=N, seed=5, run=2)
    # one raw file with both detectors (same event ids), one constants file
    with h5py.File(d / "run_jungfrau05M.h5", "a") as f, h5py.File(d / "run_epix100.h5", "r") as g:
        np.testing.assert_array_equal(f["event_id"][()], g["event_id"][()])
        g.copy("epix100", f)
    (d / "run_jungfrau05M.h5").rename(d / "run.h5")
    with h5py.File(d / "constants.h5", "w") as out:
        for det in ("jungfrau05M", "epix100"):
            with h5py.File(d / f"c_{det}.h5", "r") as c:
                c.copy(det, out)
                out.attrs.update(c.attrs)
    (d / "run.yaml").write_text(textwrap.dedent(CONFIG) % {"azav": azav_line(),
                                                        "sparsify": sparsify_line()})
    replay(d / "run.h5", load_config(d / "run.yaml"), d / "inproc.h5", get_backend("cpu"),
           progress=False)
    return d


def test_dataset_names(two_detectors):
    d = two_detectors
    with h5py.File(d / "inproc.h5", "r") as f:
        jf = f["jungfrau05M"]
        for name in ("ROI_0_sum", "ROI_0_pj_ax_1_data", "ROI_0_pj_ax_2_data", "spectrum_histogram",
                     "img_rebin4_img", "lineout_ax_0_data", "autocorr_autocorr", "autocorr_cr",
                     "droplet_nDroplets", "droplet_nDroplets_all", "droplet2photons_nPhotons",
                     "droplet2photons_prob", "photons_nPhot", "photons_row",
                     "common_mode_corrected"):
            assert name in jf and jf[name].shape[0] == N, name
        assert jf["ROI_0_pj_ax_1_data"].shape == (N, 1, 200)
        assert jf["photons_row"].shape == (N, 50)
        for field in ("data", "npix", "row", "col", "tile"):
            assert f"var_droplet/{field}" in jf
        assert jf["var_droplet_len"].shape == (N,)
        assert jf["var_droplet_len"][()].sum() == len(jf["var_droplet/data"])
        np.testing.assert_array_equal(jf["var_droplet_len"][()], jf["droplet_nDroplets"][()])
        # droplet2photons chained on the droplet: the standalone one's results
        chained = "droplet_droplet2photons_1"
        for field in ("nPhotons", "prob", "mean"):
            np.testing.assert_array_equal(jf[f"{chained}_{field}"][()],
                                          jf[f"droplet2photons_{field}"][()])
        for field in ("row", "col", "tile"):
            np.testing.assert_array_equal(jf[f"var_{chained}/{field}"][()],
                                          jf[f"var_droplet2photons/{field}"][()])
        np.testing.assert_array_equal(jf[f"var_{chained}_len"][()],
                                      jf["var_droplet2photons_len"][()])
        if "var_ROI_0_sparse" in jf:
            # sparse pixels of ROI_0 (coordinates relative to the ROI), variable and fixed
            lengths = jf["var_ROI_0_sparse_len"][()]
            assert lengths.shape == (N,) and lengths.sum() == len(jf["var_ROI_0_sparse/data"])
            for field in ("data", "row", "col", "tile"):
                assert jf[f"ROI_0_sparse_1_{field}"].shape == (N, 30)
            np.testing.assert_array_equal(jf["ROI_0_sparse_1_n"][()], lengths)
            assert jf["var_ROI_0_sparse/row"][()].max(initial=0) < 100
            assert jf["var_ROI_0_sparse/col"][()].max(initial=0) < 200
            assert np.all(jf["var_ROI_0_sparse/data"][()] >= 1.0)
            np.testing.assert_allclose(
                np.bincount(np.repeat(np.arange(N), lengths),
                            weights=jf["var_ROI_0_sparse/data"][()], minlength=N),
                jf["ROI_0_sum"][()], rtol=1e-4)
        assert f["epix100/droplet_data"].shape == (N, 20)
        assert "epix100/ROI_0_sum" in f and "both/total" in f
        cfg = f["UserDataCfg/jungfrau05M"]
        assert "ROI_0_pj_ax_1__axis" in cfg and "spectrum__edges" in cfg
        if "azav_0_azav" in jf:
            assert jf["azav_0_azav"].shape[:2] == (N, 4)
            assert "azav_0__q" in cfg


def test_services_equal_in_process_with_every_function(two_detectors, monkeypatch):
    """The workers on the compiled CPU engine (numba, 1 thread each), the in-process
    reference on NumPy's (the suite's default, conftest): the same file."""
    pytest.importorskip("numba", reason="the compiled engine needs numba (extra test)")
    d = two_detectors
    monkeypatch.setenv("GPUSMD_CPU_ENGINE", "numba")
    monkeypatch.setenv("GPUSMD_THREADS", "1")
    summary = replay_via_services(d / "run.h5", d / "run.yaml", d / "services.h5", 2, "cpu",
                                  timeout=120)
    assert summary.n_events == N
    assert_same_datasets(d / "services.h5", d / "inproc.h5")


def test_only_droplet2photons_takes_droplets(tmp_path):
    from gpusmd.errors import ConfigError
    from gpusmd.processor import DetectorProcessor
    from gpusmd.detectors import get_detector
    (tmp_path / "bad.yaml").write_text(textwrap.dedent("""\
        detectors:
          camera:
            type: camera
            functions:
              - {kind: droplet, useRms: false, threshold: 5, thresholdLow: 3, thresADU: 5}
              - {kind: projection, parent: droplet, axis: 0}
        """))
    cfg = load_config(tmp_path / "bad.yaml").detectors["camera"]
    with pytest.raises(ConfigError, match=r"functions\[1\].parent: a projection cannot take"):
        DetectorProcessor(cfg, get_detector("camera", (32, 32)), get_backend("cpu"))
