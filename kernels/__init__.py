"""CUDA C sources of gpusmd's kernels (installed as package data ``gpusmd.kernels``)."""
