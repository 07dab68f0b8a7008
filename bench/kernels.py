"""`python -m bench kernels`: Newton–Schulz time and effective TFLOP/s per shape, backend and peer.

    python -m bench kernels                                  # the device's default shapes
    python -m bench kernels --shapes 4096x4096,8x1024x4096 --backends torch,triton --out DIR

Shapes: square, 1:4 (wide), 4:1 (tall) and the batched same-shape groups the optimizer forms for
model presets. Providers: every muon backend that can run (`muon.backends.unavailable_reason` says
why one cannot: a skipped row), every importable peer (bench/peers.py), and the same run's GEMM rate
(cuBLAS on a GPU) for X·Xᵀ of that shape plus one large square GEMM as the device's ceiling.
Effective TFLOP/s = muon.flops.newton_schulz_flops (matmul FLOPs, non-symmetric count) / time, so
symmetric or Gram kernels show as a higher effective rate. Each output is also checked against the
float64 reference (relative Frobenius error), so a fast wrong kernel shows up in the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from muon import backends, flops
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize

from . import peers
from .common import (
    Results,
    default_out,
    dtype_name,
    dtype_of,
    fmt_table,
    parse_shape,
    pick_device,
    progress,
    pyplot,
    shape_str,
    synchronize,
    tflops,
    time_ms,
)

# (shape, kind): square, 1:4 (wide, m < n) and 4:1 (tall, m > n; NS transposes it).
GPU_SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192), (1024, 4096), (2048, 8192),
              (4096, 16384), (4096, 1024), (8192, 2048)]
CPU_SHAPES = [(128, 128), (256, 256), (128, 512), (512, 128)]
GPU_PRESETS = ["gpt2-124m", "llama3-8b"]
CPU_PRESETS = ["tiny"]
# Below this many NS FLOPs a GPU run is launch bound: time CUDA-graph replays instead.
GRAPH_BELOW_FLOPS = 2e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--shapes", default=None, help="comma-separated MxN or BxMxN (default: per device)")
    parser.add_argument("--preset", action="append", default=None,
                        help="add the batched NS groups of this model preset (repeatable; default per device); "
                        "'none' for no preset groups")
    parser.add_argument("--dtype", default="bf16", help="NS compute dtype (default bf16)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--coefficients", default="keller", help="muon coefficient preset (default keller)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated from {backends.BACKENDS} (default: all; on a CPU only torch "
                        "unless named, as the others would run in an interpreter)")
    parser.add_argument("--peers", default=",".join(peers.PEERS), help="comma-separated peers; '' for none")
    parser.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement (ms)")
    parser.add_argument("--gemm-size", type=int, default=None, help="square GEMM for the device ceiling")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 accuracy check")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/out/<device>)")
    parser.add_argument("--no-plot", action="store_true")


def shape_list(args, device: torch.device) -> list[tuple[tuple[int, int, int], str]]:
    shapes: list[tuple[tuple[int, int, int], str]] = []
    if args.shapes:
        for text in args.shapes.split(","):
            b, m, n = parse_shape(text.strip())
            shapes.append(((b, m, n), "given"))
    else:
        for m, n in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
            kind = "square" if m == n else ("1:4" if m < n else "4:1")
            shapes.append(((1, m, n), kind))
    presets = args.preset if args.preset is not None else (GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    for name in presets:
        if name == "none":
            continue
        report = flops.overhead(name, 1, args.steps)
        for group in report.groups:
            shapes.append((tuple(group["shape"]), f"preset:{name}"))
    return shapes


def _providers(args, device: torch.device) -> list[str]:
    names = args.backends.split(",") if args.backends else list(backends.BACKENDS)
    for name in names:
        if name not in backends.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r}; choose from {backends.BACKENDS}")
    return [f"muon[{n}]" for n in names]


def _rel_err(out, ref: torch.Tensor) -> float:
    if isinstance(out, (list, tuple)):
        out = torch.stack([o.reshape(ref.shape[1:]) for o in out])
    out = out.reshape(ref.shape).double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    dtype = dtype_of(args.dtype)
    schedule = resolve_schedule(args.coefficients, args.steps, 1e-7)
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else 300.0)
    results = Results(device)
    explicit = set(args.backends.split(",")) if args.backends else set()
    peer_names = [p for p in args.peers.split(",") if p]
    for p in peer_names:
        if p not in peers.PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r}; choose from {list(peers.PEERS)}")

    gen = torch.Generator(device=device).manual_seed(0)
    gemm_provider = "cublas" if device.type == "cuda" else "torch.matmul"

    # The device's ceiling: one large square GEMM in the compute dtype.
    size = args.gemm_size or (8192 if device.type == "cuda" else 512)
    A = torch.randn(size, size, device=device, generator=gen).to(dtype)
    Bm = torch.randn(size, size, device=device, generator=gen).to(dtype)
    ms = time_ms(lambda A=A, Bm=Bm: torch.mm(A, Bm), device, rep_ms=rep_ms)
    results.add("gemm", gemm_provider, shape_str((size, size, size)), dtype_name(dtype), kind="peak",
                ms=ms, tflops=tflops(2 * size**3, ms), status="ok")
    del A, Bm

    for (b, m, n), kind in progress(shape_list(args, device), desc="kernels", unit="shape"):
        shape = shape_str((b, m, n))
        G = torch.randn(b, m, n, device=device, generator=gen)  # fp32 gradients/momentum, as the optimizer has
        X = G.mT if m > n else G  # what backends see: m <= n
        short, long = min(m, n), max(m, n)
        ns_flops = b * flops.newton_schulz_flops(m, n, args.steps)
        graph = device.type == "cuda" and ns_flops < GRAPH_BELOW_FLOPS
        ref = None if args.no_check else orthogonalize(G, schedule, dtype=torch.float64, backend="torch")
        ref_x = None if ref is None else (ref.mT if m > n else ref)  # for peers, which get X (m <= n)

        Xd = X.to(dtype).contiguous()
        gemm_ms = time_ms(lambda Xd=Xd: torch.matmul(Xd, Xd.mT), device, rep_ms=rep_ms, graph=graph)
        gemm_rate = tflops(2 * b * short * short * long, gemm_ms)
        results.add("gemm", gemm_provider, shape, dtype_name(dtype), kind=kind, ms=gemm_ms, tflops=gemm_rate,
                    status="ok", note="X·Xᵀ of this shape")
        del Xd

        candidates: list[tuple[str, str, object, torch.Tensor | None]] = []
        for provider in _providers(args, device):
            name = provider[5:-1]
            reason = backends.unavailable_reason(name, X)
            if reason is None and device.type == "cpu" and name != "torch" and name not in explicit:
                reason = "not timed on a CPU unless named in --backends (it would run in an interpreter)"
            if reason is not None:
                results.add("newton_schulz", provider, shape, dtype_name(dtype), kind=kind, status=f"skipped: {reason}")
                continue
            candidates.append((provider, args.coefficients,
                               lambda name=name, G=G: orthogonalize(G, schedule, dtype=dtype, backend=name), ref))
        Xp = X.contiguous() if peer_names else X  # peers get a plain m <= n stack
        for peer in peer_names:
            try:
                fn = peers.load(peer, Xp, dtype)
            except peers.PeerUnavailable as exc:
                results.add("newton_schulz", peer, shape, dtype_name(dtype), kind=kind, status=f"skipped: {exc}")
                continue
            candidates.append((peer, peers.PEERS[peer][1], lambda fn=fn, Xp=Xp: fn(Xp, args.steps), ref_x))

        for provider, coefficients, fn, expected in candidates:
            try:
                out = fn()
                synchronize(device)
                err = None if expected is None else _rel_err(out, expected)
                del out
                try:
                    ms = time_ms(fn, device, rep_ms=rep_ms, graph=graph)
                except Exception:  # not graph-capturable: time eager launches instead
                    ms = time_ms(fn, device, rep_ms=rep_ms)
            except Exception as exc:
                results.add("newton_schulz", provider, shape, dtype_name(dtype), kind=kind,
                            status=f"error: {type(exc).__name__}: {exc}")
                continue
            rate = tflops(ns_flops, ms)
            results.add("newton_schulz", provider, shape, dtype_name(dtype), kind=kind, ms=ms, tflops=rate,
                        vs_gemm=rate / gemm_rate, rel_err_fp64=err, coefficients=coefficients,
                        ns_flops=ns_flops, timer="cuda-graph" if graph else ("do_bench" if device.type == "cuda"
                                                                             else "median wall clock"),
                        status="ok")

    out = args.out or default_out(device)
    paths = results.write(out, "kernels")
    shown = [r for r in results.rows if r["status"] == "ok"]
    print(fmt_table(shown, ["op", "provider", "shape", "kind", "dtype", "ms", "tflops", "vs_gemm", "rel_err_fp64"]))
    skipped = sorted({(r["provider"], r["status"]) for r in results.rows if r["status"] != "ok"})
    for provider, status in skipped:
        print(f"{provider}: {status}")
    if not args.no_plot:
        png = plot(results.rows, out / "kernels.png")
        paths += [png] if png else []
    for p in paths:
        print(f"wrote {p}")
    return 0


def plot(rows: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None

    ok = [r for r in rows if r["status"] == "ok" and r.get("kind") != "peak"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok if r["op"] == "newton_schulz"))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(shapes) + 2), 4))
    x = range(len(shapes))
    gemm = {r["shape"]: r["tflops"] for r in ok if r["op"] == "gemm"}
    ax.plot(x, [gemm.get(s, float("nan")) for s in shapes], "k--", marker="_", label="GEMM X·Xᵀ (same run)")
    for provider in providers:
        rate = {r["shape"]: r["tflops"] for r in ok if r["provider"] == provider}
        ax.plot(x, [rate.get(s, float("nan")) for s in shapes], marker="o", linestyle="", label=provider)
    peak = [r for r in rows if r.get("kind") == "peak"]
    if peak:
        # The device's plain square-GEMM rate in the same run; an NS rate above it is possible because
        # effective TFLOP/s counts NS as non-symmetric GEMMs (symmetric kernels do less work).
        ax.axhline(peak[0]["tflops"], color="grey", linewidth=0.8,
                   label=f"square GEMM {peak[0]['shape']} (device rate, same run)")
    ax.set_xticks(list(x), shapes, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("NS input shape B×m×n (batch × rows × columns)")
    ax.set_ylabel("effective TFLOP/s (NS FLOPs / time)")
    ax.set_yscale("log")
    ax.set_title(f"Newton–Schulz, {rows[0]['dtype']}, {rows[0]['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
