"""Every subpackage of gpusmd is in pyproject's package list: an editable install maps
the whole folder and would hide one left out, which a wheel then lacks."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "gpusmd").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
