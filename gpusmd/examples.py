"""Example user functions (config ``user_functions``): each takes the calibrated frames
of a batch, {detector: (B, *shape) array on the backend}, plus its configured params,
and returns {field: (B, ...) array}; gpusmd writes /<name>/<field>."""
from __future__ import annotations


def total_intensity(frames: dict, threshold: float = 0.0) -> dict:
    """Per event, the sum over all given detectors of the values above ``threshold``,
    and the share of the first detector in it."""
    sums = []
    for data in frames.values():
        axes = tuple(range(1, data.ndim))
        sums.append((data * (data > threshold)).sum(axis=axes))
    total = sum(sums)
    return {"total": total, "first_share": sums[0] / (total + (total == 0))}
