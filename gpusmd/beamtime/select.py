"""Event selections written as on the command line: ``'lightStatus/xray==1'``,
``'ipm2/sum>1000'``, several joined with ``&`` (all must hold), as smalldata_tools'
filters (a variable between limits) read."""
from __future__ import annotations

import operator
import re

import numpy as np

from ..errors import GpusmdError

OPERATORS = {"==": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge,
             "<": operator.lt, ">": operator.gt}
_CUT = re.compile(r"^\s*([^<>=!&\s]+)\s*(==|!=|<=|>=|<|>)\s*([^<>=!&\s]+)\s*$")


class Selection:
    """A conjunction of cuts ``name OP number``; ``str()`` gives it back as text."""

    def __init__(self, texts=()):
        self.cuts: list[tuple[str, str, float]] = []
        for text in texts or ():
            for part in str(text).split("&"):
                if not part.strip():
                    continue
                m = _CUT.match(part)
                if not m:
                    raise GpusmdError(f"selection {part.strip()!r}: expected NAME OP VALUE with "
                                      f"OP one of {', '.join(OPERATORS)}, e.g. 'ipm2/sum>1000'")
                name, op, value = m.groups()
                try:
                    number = float(value)
                except ValueError:
                    raise GpusmdError(f"selection {part.strip()!r}: {value!r} is not a number") \
                        from None
                self.cuts.append((name.strip("/"), op, number))

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _, _ in self.cuts))

    def __bool__(self) -> bool:
        return bool(self.cuts)

    def __str__(self) -> str:
        return " & ".join(f"{n}{op}{v:g}" for n, op, v in self.cuts)

    def check(self, available, where: str):
        """Every name the cuts use is one of ``available`` (else one error naming ``where``)."""
        missing = [n for n in self.names if n not in available]
        if missing:
            raise GpusmdError(f"{where}: no per-event value {missing[0]!r} to select on (it has: "
                              f"{', '.join(sorted(available)) or 'none'})")

    def __call__(self, columns: dict, n: int) -> np.ndarray:
        """(n,) bool: the events of ``columns`` (name -> (n,) array) that pass every cut."""
        keep = np.ones(n, bool)
        for name, op, value in self.cuts:
            keep &= OPERATORS[op](np.asarray(columns[name]), value)
        return keep
