"""Optimizer-step benchmarks: step time against AdamW and torch.optim.Muon (`python -m bench step`,
step_time.py), the step under the profiler (`profile`, profile.py), the step's FLOP overhead
(`flops`, flops.py) and the distributed step on GPUs under torchrun (dist_step_time.py). Step memory
is memory.py here (`python -m bench memory`). Nothing here imports another bench subpackage."""
