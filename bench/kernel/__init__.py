"""Kernel microbenchmarks: Newton–Schulz per backend and shape (`python -m bench kernels`,
newton_schulz.py) against other libraries' NS where installed (peers.py), and the fused
low-precision momentum pass against a copy of the same bytes (momentum.py, rows of the same
command). Shared helpers (timing, rows, plots) are bench/'s top-level modules; nothing here imports
another bench subpackage."""
