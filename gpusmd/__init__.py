"""gpusmd: GPU-accelerated small data for X-ray area detectors."""
__version__ = "0.1.0"
