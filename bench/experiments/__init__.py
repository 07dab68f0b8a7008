"""Experiments: what the optimizer's choices buy, measured by training or by error — the telescoping
muP sweep (`python -m bench telescope`, telescope.py), Newton–Schulz error per FLOP (`quality`,
quality.py), fp32 vs bf16 NS on this CPU (`ns-dtype`, ns_dtype.py) and low-precision optimizer state
(`state-dtype`, state_dtype.py). The data-efficiency experiment
and its model and data are bench/efficiency.py, bench/gpt.py and bench/data.py. Nothing here imports
another bench subpackage."""
