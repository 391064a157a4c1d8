"""Config validation: every problem is refused with the file and the key named."""
import textwrap

import pytest

from gpusmd.config import load_config
from gpusmd.errors import ConfigError

GOOD = """
detectors:
  epix10kquad:
    calib: constants.h5
    common_mode: 0
    functions:
      - {kind: roi, name: ROI_0, bounds: [[0, 1], [10, 100], [20, 200]], thresADU: [0.5, null], writeArea: true}
      - {kind: roi, bounds: [[0, 4], [0, 352], [0, 384]]}
    sums: [calib, calib_max, calib_thresADU5]
"""


def write(tmp_path, text, constants=True):
    if constants:
        (tmp_path / "constants.h5").write_bytes(b"")
    p = tmp_path / "run.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    det = cfg.detectors["epix10kquad"]
    assert [f.name for f in det.functions] == ["ROI_0", "ROI_1"]
    assert det.calib == tmp_path / "constants.h5"
    assert det.sums == ["calib", "calib_max", "calib_thresADU5"]
    assert cfg.batch_size == 16 and cfg.text.startswith("\ndetectors")


@pytest.mark.parametrize("edit, where, words", [
    (("common_mode: 0", "common_mod: 0"), "detectors.epix10kquad.common_mod", "unknown key"),
    (("common_mode: 0", "common_mode: 99"), "detectors.epix10kquad.common_mode",
     "unknown common-mode code 99"),
    (("common_mode: 0", "common_mode: 71"), "detectors.epix10kquad.common_mode",
     "not known for a epix10k detector"),
    (("common_mode: 0", "common_mode: [4, 6, 30, 10]"), "detectors.epix10kquad.common_mode",
     "mode 4 does not apply to a epix10k detector"),
    (("common_mode: 0", "common_mode: [9, 1]"), "detectors.epix10kquad.common_mode",
     "mode 9 does not apply"),
    (("common_mode: 0", "common_mode: yes"), "detectors.epix10kquad.common_mode", "boolean"),
    (("thresADU: [0.5, null]", "thresADU: [0.5, high]"),
     "detectors.epix10kquad.functions[0].thresADU", "expected a number"),
    (("writeArea: true", "writeArea: 'False'"),
     "detectors.epix10kquad.functions[0].writeArea", "true or false"),
    (("kind: roi, name: ROI_0", "kind: rio, name: ROI_0"),
     "detectors.epix10kquad.functions[0].kind", "'rio' is not one of"),
    (("[[0, 1], [10, 100], [20, 200]]", "[[0, 1], [10, 100], [20]]"),
     "detectors.epix10kquad.functions[0].bounds[2]", "expected [lo, hi]"),
    (("calib_thresADU5", "calib_median"), "detectors.epix10kquad.sums[2]", "unknown sum"),
    (("name: ROI_0,", "name: ROI_1,"), "detectors.epix10kquad.functions", "unique"),
])
def test_bad_config_names_file_and_key(tmp_path, edit, where, words):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {where}:"), msg
    assert words in msg and "\n" not in msg


def test_missing_constants_file(tmp_path):
    path = write(tmp_path, GOOD, constants=False)
    with pytest.raises(ConfigError, match=r"detectors.epix10kquad.calib: constants file .* not found"):
        load_config(path)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "detectors: [unclosed"))
    with pytest.raises(ConfigError, match="detectors: required key is missing"):
        load_config(write(tmp_path, "batch_size: 4\n"))
