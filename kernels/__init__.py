"""Fused Triton kernels for bf16 Newton–Schulz (installed as `muon.kernels`)."""
