"""`python -m bench step`: one optimizer step on a preset's real parameters, Muon against AdamW.

    python -m bench step --model gpt2-124m --batch 8        # on a GPU
    python -m bench step                                     # CPU default: the "small" preset

Providers: muon.Muon per runnable backend, batched (same-shape matrices in one NS call) and not;
torch.optim.AdamW fused (where this torch supports it) and foreach; torch.optim.Muon on the Muon
matrices with torch AdamW (foreach) on the rest. Reported: median step time, optimizer state bytes,
peak extra memory during the step (CUDA only; unmeasured on a CPU), and the overhead over the
AdamW baseline as a fraction of a measured forward+backward of the same model at --batch sequences,
beside the FLOP model's prediction (muon.flops) for the same batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import muon
from muon import backends, flops

from .common import Results, default_out, fmt_table, pick_device, progress, synchronize, time_ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--model", default=None,
                        help="preset or 'custom:...' (default: gpt2-124m on a GPU, small on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per forward+backward (default 8 GPU, 2 CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--backends", default=None, help=f"muon backends, comma-separated from {backends.BACKENDS}")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (ms)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def _optimizers(model: torch.nn.Module, device: torch.device, names: list[str]) -> dict[str, object]:
    """provider -> factory returning (step function, [optimizers]) or a skip reason."""
    groups = muon.param_groups(model)
    matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
    rest = [p for g in groups if not g["use_muon"] for p in g["params"]]
    probe = matrices[0].detach()[None] if matrices else torch.zeros(1, 1, 1, device=device)
    factories: dict[str, object] = {}
    for name in names:
        reason = backends.unavailable_reason(name, probe)
        if reason is None and device.type == "cpu" and name != "torch":
            reason = "not timed on a CPU (it would run in an interpreter)"
        for batched in (True, False):
            key = f"muon.Muon[{name}{',batched' if batched else ''}]"
            factories[key] = reason or (
                lambda name=name, batched=batched: [muon.Muon(muon.param_groups(model), lr=0.02, backend=name,
                                                              batched=batched, adjust_lr_fn="match_rms_adamw")])
    params = list(model.parameters())
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        factories["torch.optim.AdamW[fused]"] = lambda: [torch.optim.AdamW(params, lr=1e-3, fused=True)]
    except (RuntimeError, TypeError, ValueError) as exc:
        factories["torch.optim.AdamW[fused]"] = f"fused AdamW unsupported here: {exc}"
    factories["torch.optim.AdamW[foreach]"] = lambda: [torch.optim.AdamW(params, lr=1e-3, foreach=True)]
    if hasattr(torch.optim, "Muon") and all(p.ndim == 2 for p in matrices):
        factories["torch.optim.Muon+AdamW[foreach]"] = lambda: [
            torch.optim.Muon(matrices, lr=0.02, adjust_lr_fn="match_rms_adamw"),
            *([torch.optim.AdamW(rest, lr=1e-3, foreach=True)] if rest else []),
        ]
    else:
        factories["torch.optim.Muon+AdamW[foreach]"] = "torch.optim.Muon missing or a Muon parameter is not 2-D"
    return factories


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    spec = args.model or ("gpt2-124m" if device.type == "cuda" else "small")
    cfg = flops.parse_model(spec)
    if not isinstance(cfg, flops.TransformerConfig):
        raise SystemExit("--model: the step benchmark needs a preset or a custom: transformer (it runs forward)")
    batch = args.batch or (8 if device.type == "cuda" else 2)
    seq = args.seq_len or cfg.seq_len
    rep_ms = args.rep_ms or (200.0 if device.type == "cuda" else 500.0)
    names = args.backends.split(",") if args.backends else list(backends.BACKENDS)
    results = Results(device)

    torch.manual_seed(0)
    model = flops.build(cfg, device=device)
    idx = torch.randint(0, cfg.vocab, (batch, seq), device=device)
    # bf16 autocast on a GPU (how such models train); plain fp32 on a CPU, where bf16 autocast is slower.
    if device.type == "cuda":
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        amp = torch.autocast("cpu", enabled=False)

    def forward_backward():
        with amp:
            logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()

    fb_ms = time_ms(forward_backward, device, rep_ms=rep_ms)
    tokens = batch * (seq - 1)
    predicted = flops.overhead(cfg, tokens, seq_len=seq)
    results.add("forward_backward", "torch", spec, "bf16 autocast" if device.type == "cuda" else "float32",
                ms=fb_ms, batch_tokens=tokens, status="ok")

    grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}
    baseline_ms = None
    rows = []
    for provider, factory in progress(list(_optimizers(model, device, names).items()), desc="step", unit="opt"):
        if isinstance(factory, str):
            results.add("optimizer_step", provider, spec, "float32", status=f"skipped: {factory}")
            continue
        for p in model.parameters():
            p.grad = grads[p].clone()
        try:
            opts = factory()

            def step(opts=opts):
                for opt in opts:
                    opt.step()

            step()  # state initialization happens on the first step: not timed
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step()
                synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - before
            else:
                peak = None  # no allocator statistics on the CPU: unmeasured
            ms = time_ms(step, device, rep_ms=rep_ms)
        except Exception as exc:
            results.add("optimizer_step", provider, spec, "float32", status=f"error: {type(exc).__name__}: {exc}")
            continue
        state = sum(_state_bytes(o) for o in opts)
        if provider.startswith("torch.optim.AdamW") and (baseline_ms is None or provider.endswith("[fused]")):
            baseline_ms = ms
        rows.append(results.add("optimizer_step", provider, spec, "float32", ms=ms, state_bytes=state,
                                peak_step_bytes=peak, step_over_fwd_bwd=ms / fb_ms, batch_tokens=tokens,
                                status="ok"))
        del opts
    for row in rows:
        if baseline_ms is not None:
            row["overhead_vs_adamw"] = (row["ms"] - baseline_ms) / fb_ms
        row["flop_model_overhead"] = predicted.overhead

    out = args.out or default_out(device)
    paths = results.write(out, "step")
    print(f"{spec} on {results.meta['device']}: forward+backward of {batch}x{seq} tokens = {fb_ms:.3f} ms")
    print(fmt_table([r for r in results.rows if r["op"] == "optimizer_step" and r["status"] == "ok"],
                    ["provider", "ms", "state_bytes", "peak_step_bytes", "step_over_fwd_bwd", "overhead_vs_adamw",
                     "flop_model_overhead"]))
    for r in results.rows:
        if r["status"] != "ok":
            print(f"{r['provider']}: {r['status']}")
    for p in paths:
        print(f"wrote {p}")
    return 0
