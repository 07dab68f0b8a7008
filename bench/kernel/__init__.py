"""Kernel microbenchmarks: Newton–Schulz per backend and shape (`python -m bench kernels`,
newton_schulz.py) against other libraries' NS where installed (peers.py). Shared helpers (timing,
rows, plots) are bench/'s top-level modules; nothing here imports another bench subpackage."""
