"""Shared by the benchmarks: a simulated run with its constants and config, the machine's
description, and writing a results table as JSON and Markdown."""
from __future__ import annotations

import json
import os
import platform
import socket
import textwrap
import time
from pathlib import Path

# $GPUSMD_BENCH_RESULTS sends the tables elsewhere (a rehearsal that must not replace them)
RESULTS = Path(os.environ.get("GPUSMD_BENCH_RESULTS") or Path(__file__).parent / "results")


def prepare_run(workdir: Path, detector: str, n_events: int, functions: str, sums="[calib]",
                batch_size: int = 16, extra: str = "") -> Path:
    """dark.h5, run.h5, constants.h5 and run.yaml in workdir (reused when present)."""
    from gpusmd.calib.dark import process_dark
    from gpusmd.simulate import simulate_run
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / "run.h5"
    if not raw.exists():
        simulate_run(workdir / "dark.h5", detector, n_events=10, dark=True, run=1)
        process_dark(workdir / "dark.h5", workdir / "constants.h5")
        simulate_run(raw, detector, n_events=n_events, run=2)
    (workdir / "run.yaml").write_text(textwrap.dedent(f"""\
        batch_size: {batch_size}
        detectors:
          {detector}:
            calib: constants.h5
            functions:
        """) + textwrap.indent(textwrap.dedent(functions), " " * 6)
        + f"    sums: {sums}\n" + extra)
    return raw


def machine() -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write_results(name: str, title: str, columns: list[str], rows: list[list], notes: str = "",
                  extra: dict | None = None) -> Path:
    """bench/results/<name>.json and .md; returns the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    data = {"title": title, "machine": m, "columns": columns, "rows": rows, "notes": notes,
            **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    lines = [f"# {title}", "", f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m['platform']}, "
             f"Python {m['python']}; {m['date']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    md = RESULTS / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def print_table(columns, rows):
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
