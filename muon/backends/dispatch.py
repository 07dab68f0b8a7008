"""Dispatch tables: which Newton–Schulz backend and algorithm runs a given problem.

Every threshold here says where it comes from: a measurement (with its device and commit) or a public
reference implementation.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------- NS algorithm
# algorithm="auto": standard Newton–Schulz or Gram Newton–Schulz (muon.backends.torch_backend.run_gram).
#
# Gram NS only in half precision (bf16, fp16): that is what it is built for (its restart keeps it
# within ~2x of torch's own half-precision error, see tests/test_gram_ns.py), while in fp32 its error
# reached 15x standard NS's on our inputs (the output is Q·X with ‖Q‖ up to ~30 on the small singular
# directions, and Q's rounding is relative to ‖Q‖). fp32/fp64 callers asked for accuracy: standard.
GRAM_DTYPES = (torch.bfloat16, torch.float16)

# Aspect ratio: Gram NS only for long/short > 2. Source: the FLOP model (muon.flops, 5 steps, one
# restart): Gram/standard = (8e + 28) / (20e + 10) at n = e·m, i.e. 0.88 at 1:2, 0.67 at 1:4, 0.54 at
# 1:8; a 12 % saving at 1:2 is within what kernel efficiency differences eat (the one measurement
# below realised 0.79 where the model says 0.67). Public reference: Dao-AILab/gram-newton-schulz keeps
# standard NS on square matrices (its Gram path engages only above aspect ratio 1).
GRAM_MIN_ASPECT = 2.0

# Small side on CUDA: Gram NS from 2048 up. Source: measurement, H100, commit 899c9f9
# (/work/shared/measurements.md; gram-newton-schulz 0.1.6's own kernels, Gram vs its standard NS, ms):
#   1×4096×16384: 5.71 vs 8.49 (0.67x)    1×2048×8192: 1.96 vs 2.47 (0.79x)
#   24×768×3072:  2.43 vs 2.26 (1.08x)    4×1024×4096: 2.68 vs 1.40 (1.91x)
# so Gram wins at 2048 and 4096 and loses at 768 and 1024 (batched). Muon's own Gram kernels are
# unmeasured. Public reference: gram-newton-schulz runs dense (non-symmetric) kernels below a small
# side of 256, where symmetric tiling has nothing to save; our CUDA threshold is above that anyway.
GRAM_MIN_SIDE_CUDA = 2048

# Other devices (the CPU): the FLOP model decides (see choose_algorithm). A check, not the source of
# the rule: CPU timings (2-thread AMD EPYC shared with other jobs, so noisy; `python -m bench kernels`,
# bf16, 300 ms per point), Gram vs standard ms: 2×32×128 10.8 vs 18.2; 8×32×128 40.8 vs 75.2;
# 64×96 72 vs 188; 64×256 20.6 vs 59.8; 2×64×256 236 vs 392; 128×256 390 vs 497; 128×512 408 vs 668.

ALGORITHMS = ("standard", "gram", "auto")


def choose_algorithm(m: int, n: int, device, dtype: torch.dtype, *, steps: int = 5, restarts=(2,)) -> str:
    """"standard" or "gram" for one m×n matrix (or a batch of them) of NS in compute `dtype` on `device`.

    CUDA: Gram for half precision, aspect > GRAM_MIN_ASPECT and small side >= GRAM_MIN_SIDE_CUDA.
    Other devices (the CPU): Gram for half precision wherever the FLOP model (muon.flops with this
    `steps` and `restarts`) counts fewer matmul FLOPs than standard NS — at 5 steps with one restart
    that is n > 1.5·m — because there is no measurement to go on and the CPU's matmul time follows
    its FLOPs; half precision because Gram NS is stable there (restart) and less accurate in fp32.
    """
    from ..flops import newton_schulz_flops

    short, long = min(m, n), max(m, n)
    if dtype not in GRAM_DTYPES or short == 0 or steps == 0:
        return "standard"
    if torch.device(device).type == "cuda":
        if long > GRAM_MIN_ASPECT * short and short >= GRAM_MIN_SIDE_CUDA:
            return "gram"
        return "standard"
    gram = newton_schulz_flops(short, long, steps, algorithm="gram", restarts=restarts)
    return "gram" if gram < newton_schulz_flops(short, long, steps) else "standard"
