"""Experiments: what the optimizer's choices buy, measured by training or by error — the telescoping
muP sweep (`python -m bench telescope`, telescope.py), Newton–Schulz error per FLOP (`quality`,
quality.py), fp32 vs bf16 NS on this CPU (`ns-dtype`, ns_dtype.py), low-precision optimizer state
(`state-dtype`, state_dtype.py) and Muon vs AdamW data efficiency (`efficiency`, efficiency.py and the
seeded sweep of its presets, efficiency_sweep.py); the model and data they train are bench/gpt.py and
bench/data.py. Nothing here imports
another bench subpackage."""
