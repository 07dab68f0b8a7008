"""`python -m bench kernels`: Newton–Schulz time and TFLOP/s per shape, muon path and peer.

    python -m bench kernels                                  # the device's default shapes
    python -m bench kernels --shapes 4096x4096,8x1024x4096 --backends torch,triton:persistent --out DIR

Shapes: the shapes of the H100 measurement the dispatch table comes from (bench/results/h100-899c9f9),
a few small-side classes, and the batched same-shape groups the optimizer forms for model presets.
Providers: every muon path — muon[torch], muon[auto] (what backend="auto" runs), muon[triton] (the
Triton backend's default, kernel v1), the forced muon[triton:small] / [triton:gemm] /
[triton:persistent] paths, muon[cuda] — each with its `kernel_version`; the NS variants of issue 21
on the torch backend and the Triton default path: muon[torch:aol] / muon[triton:aol] (AOL
preconditioning at --aol-steps, default one step fewer: Turbo-Muon's setting) and muon[torch:fp16] /
muon[triton:fp16] (fp16 compute, rows with dtype float16); every importable peer
(bench/kernel/peers.py), and the same run's GEMM rate (cuBLAS on a GPU) for X·Xᵀ of that shape plus one large
square GEMM as the device's ceiling. Then the fused low-precision momentum pass against a copy of the
same bytes (bench/kernel/momentum.py; op low_precision_momentum, a skipped row on a CPU).

Timing (bench/timing.py): per shape, every provider and the shape's GEMM in --rounds interleaved
rounds (CPU, one thread: process CPU time; CUDA: triton.testing.do_bench per round, CUDA-graph replay for
tiny shapes); rows (bench/schema.py)
give the median ms, the spread (IQR / median), min, max and a "noisy" flag.

Fields in each row's `extra`: `tflops` = effective rate, muon.flops.newton_schulz_flops (standard NS, every product
full) / time; `actual_tflops` = the FLOPs the kernel really does / time (symmetric=True count for
the kernels that compute one triangle of X·Xᵀ and A·A: triton gemm/persistent, cuda); `pct_cublas` =
actual_tflops as % of the same run's large cuBLAS GEMM; `vs_gemm` = effective rate / the rate of the
X·Xᵀ GEMM of the shape; `rel_err_fp64` = relative Frobenius error against the float64 reference;
`vs_torch_optim_muon` (muon rows) = [median, min, max] of the per-round ratio torch.optim.Muon's time
/ this provider's.
The CSV is the format `muon.backends.dispatch.table_from_csv` reads: a GPU run's kernels.csv can
replace the table auto decides from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from muon import backends, flops
from muon.coefficients import resolve_schedule
from muon.newton_schulz import orthogonalize, resolve_dtype

from .. import models, plots
from ..common import (
    default_out,
    dtype_name,
    dtype_of,
    fmt_table,
    parse_shape,
    pick_device,
    progress,
    set_threads,
    shape_str,
    skip_line,
    synchronize,
    tflops,
    wrap,
)
from ..schema import Results
from ..timing import interleaved, ratio
from . import momentum, peers

# (B, m, n): the H100 measurement of the dispatch table (muon/backends/dispatch.py), then small-side and
# mid-size classes it does not cover yet, one tall shape (m > n; NS transposes it).
GPU_SHAPES = [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192), (1, 2048, 8192),
              (1, 4096, 16384), (12, 768, 768), (24, 768, 3072), (4, 1024, 4096), (16, 2048, 2048),
              (64, 128, 128), (32, 64, 1024),
              (1, 128, 128), (8, 128, 512), (1, 64, 4096), (4, 256, 1024), (1, 512, 512), (8, 512, 2048),
              (1, 8192, 2048)]
CPU_SHAPES = [(1, 128, 128), (1, 256, 256), (1, 128, 512), (1, 512, 128)]
GPU_PRESETS = ["gpt2-124m"]
CPU_PRESETS = ["tiny"]
# muon providers: (name, backend, triton path or None)
MUON_PROVIDERS = [("torch", "torch", None), ("auto", "auto", None), ("triton", "triton", "auto"),
                  ("triton:small", "triton", "small"), ("triton:gemm", "triton", "gemm"),
                  ("triton:persistent", "triton", "persistent"), ("cuda", "cuda", None)]
# kernels that compute one triangle of the two symmetric products (count muon.flops symmetric=True)
SYMMETRIC = {"triton:gemm", "triton:persistent", "cuda"}
# NS variants (issue 21): name -> (the MUON_PROVIDERS entry it varies, what it changes)
VARIANTS = {"torch:aol": ("torch", "aol"), "triton:aol": ("triton", "aol"), "torch:fp16": ("torch", "fp16"),
            "triton:fp16": ("triton", "fp16")}
# Below this many NS FLOPs a GPU run is launch bound: time CUDA-graph replays instead.
GRAPH_BELOW_FLOPS = 2e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--shapes", default=None, help="comma-separated MxN or BxMxN (default: per device)")
    parser.add_argument("--preset", action="append", default=None,
                        help="add the batched NS groups of this model preset (repeatable; default per device); "
                        "'none' for no preset groups")
    parser.add_argument("--dtype", default="auto",
                        help="NS compute dtype of the muon providers: auto (default: what ns_dtype='auto' picks per "
                        "shape, bf16 on CUDA and fp32 on a CPU unless its measured table says bf16), bf16, fp16, fp32; "
                        "torch.optim.Muon computes in bf16 whatever is chosen here")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--aol-steps", type=int, default=None,
                        help="steps of the AOL providers (default: --steps - 1, Turbo-Muon's setting)")
    parser.add_argument("--coefficients", default="keller", help="muon coefficient preset (default keller)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated from {backends.BACKENDS} (default: all; on a CPU only torch "
                        "unless named, as the others would run in an interpreter)")
    parser.add_argument("--peers", default=",".join(peers.PEERS), help="comma-separated peers; '' for none")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per shape (default 10)")
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="time per provider and shape over all rounds, about (ms; default 300 CPU, 100 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU)")
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
        for b, m, n in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
            kind = "square" if m == n else ("wide" if m < n else "tall")
            shapes.append(((b, m, n), kind))
    presets = args.preset if args.preset is not None else (GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    for name in presets:
        if name == "none":
            continue
        report = models.overhead(name, 1, args.steps)
        for group in report.groups:
            shapes.append((tuple(group["shape"]), f"preset:{name}"))
    return shapes


def _providers(args, device: torch.device) -> list[str]:
    known = [p[0] for p in MUON_PROVIDERS] + list(VARIANTS)
    names = args.backends.split(",") if args.backends else known
    for name in names:
        if name not in known:
            raise SystemExit(f"--backends: unknown muon provider {name!r}; choose from {known}")
    return [f"muon[{n}]" for n in names]


def _muon_call(name: str, G: torch.Tensor, X: torch.Tensor, schedule, dtype: torch.dtype):
    """(reason it cannot run or None, the call, kernel version, symmetric-FLOP kernel?) of a muon provider."""
    from muon.backends import dispatch

    name = VARIANTS[name][0] if name in VARIANTS else name
    _, backend, path = next(p for p in MUON_PROVIDERS if p[0] == name)
    X3 = X.reshape(-1, *X.shape[-2:])
    if backend == "auto":
        choice = dispatch.choose_backend(X3, dtype)
        label = choice.backend + (f":{choice.kwargs['path']}" if choice.kwargs.get("path") else "")
        from muon.backends import triton_backend

        version = "torch" if choice.backend == "torch" else triton_backend.kernel_version(choice.kwargs["path"])
        return None, (lambda: orthogonalize(G, schedule, dtype=dtype, backend="auto")), f"auto->{label} {version}", \
            label in SYMMETRIC or (choice.kwargs.get("path") == "auto" and min(X.shape[-2:]) > 128)
    reason = backends.unavailable_reason(backend, X)
    if reason is not None:
        return reason, None, "", False
    if backend != "triton":
        return None, (lambda: orthogonalize(G, schedule, dtype=dtype, backend=backend)), \
            {"torch": "torch", "cuda": "cuda-v1"}[backend], name in SYMMETRIC
    from muon import kernels
    from muon.backends import triton_backend

    m = min(X.shape[-2:])
    if path == "small" and m > kernels.MAX_SMALL_SIDE:
        return f"the fused path takes a small side up to {kernels.MAX_SMALL_SIDE}", None, "", False
    sym = name in SYMMETRIC or (path == "auto" and not triton_backend.use_small_path(X3.shape[0], *X3.shape[1:], dtype))
    return None, (lambda: triton_backend.run(X3, schedule, dtype, path=path)), triton_backend.kernel_version(path), sym


def _rel_err(out, ref: torch.Tensor) -> float:
    if isinstance(out, (list, tuple)):
        out = torch.stack([o.reshape(ref.shape[1:]) for o in out])
    out = out.reshape(ref.shape).double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    set_threads(args.threads, device)
    auto = args.dtype == "auto"
    fixed = None if auto else dtype_of(args.dtype)
    schedule = resolve_schedule(args.coefficients, args.steps, 1e-7)
    aol_steps = args.steps - 1 if args.aol_steps is None else args.aol_steps
    if aol_steps < 0:
        raise SystemExit(f"--aol-steps must be >= 0, got {aol_steps}")
    aol_schedule = resolve_schedule(args.coefficients, aol_steps, 1e-7, precondition="aol")
    rounds = args.rounds or 10
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else 300.0)
    results = Results(device, "kernels")
    explicit = set(args.backends.split(",")) if args.backends else set()
    peer_names = [p for p in args.peers.split(",") if p]
    for p in peer_names:
        if p not in peers.PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r}; choose from {list(peers.PEERS)}")

    gen = torch.Generator(device=device).manual_seed(0)
    gemm_provider = "cublas" if device.type == "cuda" else "torch.matmul"
    kernel = device.type == "cuda"  # do_bench per round on a GPU

    # The device's ceiling: one large square GEMM in the compute dtype.
    size = args.gemm_size or (8192 if device.type == "cuda" else 512)
    peak_dtype = fixed or resolve_dtype("auto", device, (size, size))
    A = torch.randn(size, size, device=device, generator=gen).to(peak_dtype)
    Bm = torch.randn(size, size, device=device, generator=gen).to(peak_dtype)
    peak = interleaved({"peak": lambda A=A, Bm=Bm: torch.mm(A, Bm)}, device, rounds=rounds, budget_ms=rep_ms,
                       kernel=kernel)["peak"].stats
    peak_rate = tflops(2 * size**3, peak.median)
    results.add("gemm", gemm_provider, shape_str((size, size, size)), dtype_name(peak_dtype), stats=peak, kind="peak",
                tflops=peak_rate)
    del A, Bm

    out_dir = args.out or default_out(device)
    for (b, m, n), kind in progress(shape_list(args, device), desc="kernels", unit="shape"):
        # rows so far on disk after every shape: a run cut short by a time limit keeps what it measured
        if results.rows:
            results.write(out_dir, "kernels")
        measure_shape(args, device, (b, m, n), kind, fixed, schedule, aol_schedule, aol_steps, gen, peer_names,
                      explicit, gemm_provider, peak_rate, rounds, rep_ms, results)

    momentum.measure(device, results, rounds, rep_ms)  # the fused low-precision momentum pass (issue 30)
    paths = results.write(out_dir, "kernels")
    clock = next((r["clock"] for r in results.ok("newton_schulz")), "")
    print(wrap(f"Newton–Schulz on {results.meta['device']}, commit {results.meta['commit']}: {clock}, median of "
               f"{rounds} interleaved rounds per shape; best = fastest muon backend (same steps, standard NS)"))
    print(console_table(results.rows))
    line = skip_line(results.rows, "kernels.csv")
    if line:
        print(line)
    if not args.no_plot:
        png = plots.kernels([r for r in results.rows if r["op"] != momentum.OP], out_dir / "kernels.png")
        paths += [png] if png else []
    print("wrote " + ", ".join(p.name for p in paths) + f" in {out_dir}")
    return 0


BASE_PROVIDERS = tuple(f"muon[{p[0]}]" for p in MUON_PROVIDERS)  # same algorithm, steps and dtype as each other
PEER = "torch.optim.Muon"


def measure_shape(args, device, bmn, kind, fixed, schedule, aol_schedule, aol_steps, gen, peer_names, explicit,
                  gemm_provider, peak_rate, rounds, rep_ms, results: Results) -> None:
    """Every provider's rows for one NS input shape, timed in the same interleaved rounds."""
    b, m, n = bmn
    dtype = fixed or resolve_dtype("auto", device, (m, n))
    shape = shape_str((b, m, n))
    G = torch.randn(b, m, n, device=device, generator=gen)  # fp32 gradients/momentum, as the optimizer has
    X = G.mT if m > n else G  # what backends see: m <= n
    short, long = min(m, n), max(m, n)
    ns_flops = b * flops.newton_schulz_flops(m, n, args.steps)
    sym_flops = b * flops.newton_schulz_flops(m, n, args.steps, symmetric=True)
    graph = device.type == "cuda" and ns_flops < GRAPH_BELOW_FLOPS
    ref = None if args.no_check else orthogonalize(G, schedule, dtype=torch.float64, backend="torch")
    ref_x = None if ref is None else (ref.mT if m > n else ref)  # for peers, which get X (m <= n)
    aol_ref = None if args.no_check else orthogonalize(G, aol_schedule, dtype=torch.float64, backend="torch")
    aol_flops = b * flops.newton_schulz_flops(m, n, aol_steps, precondition="aol")
    aol_sym_flops = b * flops.newton_schulz_flops(m, n, aol_steps, symmetric=True, precondition="aol")

    # provider -> (call, expected output, extra row fields, FLOPs the kernel really does)
    calls: dict[str, tuple] = {}
    Xd = X.to(dtype).contiguous()
    calls["gemm"] = (lambda Xd=Xd: torch.matmul(Xd, Xd.mT), None,
                     {"dtype": dtype_name(dtype), "note": "X·Xᵀ of this shape"}, 2 * b * short * short * long)
    for provider in _providers(args, device):
        name = provider[5:-1]
        variant = VARIANTS.get(name, (None, None))[1]
        v_schedule = aol_schedule if variant == "aol" else schedule
        v_dtype = torch.float16 if variant == "fp16" else dtype
        extra = {"dtype": dtype_name(v_dtype), "ns_steps": v_schedule.steps, "precondition": v_schedule.precondition,
                 "coefficients": args.coefficients}
        reason, call, version, symmetric = _muon_call(name, G, X, v_schedule, v_dtype)
        base = VARIANTS[name][0] if name in VARIANTS else name
        if reason is None and device.type == "cpu" and base not in ("torch", "auto") and name not in explicit:
            reason = "not timed on a CPU unless named in --backends (it would run in an interpreter)"
        if reason is not None:
            results.add("newton_schulz", provider, shape, extra["dtype"], kind=kind, status=f"skipped: {reason}")
            continue
        v_ref = aol_ref if variant == "aol" else ref
        expected = v_ref if not name.startswith("triton") or v_ref is None else v_ref.mT if m > n else v_ref
        if variant == "aol":
            work = aol_sym_flops if symmetric else aol_flops
        else:
            work = sym_flops if symmetric else ns_flops
        calls[provider] = (call, expected, {**extra, "kernel_version": version}, work)
    # Gram Newton–Schulz (restart at step 2) on the default backend: "effective" TFLOP/s counts standard
    # NS's FLOPs as for every provider, "actual" the Gram NS FLOPs it does
    gram_flops = b * flops.newton_schulz_flops(m, n, args.steps, algorithm="gram")
    plain = {"dtype": dtype_name(dtype), "ns_steps": schedule.steps, "precondition": schedule.precondition,
             "coefficients": args.coefficients}
    calls["muon[gram]"] = (lambda G=G: orthogonalize(G, schedule, dtype=dtype, backend="auto", algorithm="gram"),
                           ref, {**plain, "kernel_version": "torch"}, gram_flops)
    if device.type == "cuda" and backends.unavailable_reason("triton", X) is None:
        # muon's own Gram kernels (kernels/gram_ns.py), which auto does not pick until timed here
        calls["muon[gram:triton]"] = (lambda G=G: orthogonalize(G, schedule, dtype=dtype, backend="triton",
                                                                algorithm="gram"), ref,
                                      {**plain, "kernel_version": "gram-v1"}, gram_flops)
    Xp = X.contiguous() if peer_names else X  # peers get a plain m <= n stack
    for peer in peer_names:
        # torch.optim.Muon computes in bf16 only: under --dtype auto it gets its own dtype
        p_dtype = torch.bfloat16 if fixed is None and peer == PEER else dtype
        try:
            fn = peers.load(peer, Xp, p_dtype)
        except peers.PeerUnavailable as exc:
            results.add("newton_schulz", peer, shape, dtype_name(p_dtype), kind=kind, status=f"skipped: {exc}")
            continue
        calls[peer] = (lambda fn=fn, Xp=Xp: fn(Xp, args.steps), ref_x,
                       {**plain, "dtype": dtype_name(p_dtype), "coefficients": peers.PEERS[peer][1],
                        "kernel_version": peers.version(peer)},
                       sym_flops if peers.PEERS[peer][2] else ns_flops)

    errors, runnable = {}, {}
    for provider, (fn, expected, extra, _) in calls.items():
        try:
            out = fn()
            synchronize(device)
            errors[provider] = None if expected is None else _rel_err(out, expected)
            del out
            runnable[provider] = fn
        except Exception as exc:
            results.add("newton_schulz", provider, shape, extra["dtype"], kind=kind,
                        status=f"error: {type(exc).__name__}: {exc}")
    samples = interleaved(runnable, device, rounds=rounds, budget_ms=rep_ms, kernel=device.type == "cuda",
                          graph=graph, warmup=0)
    timer = "cuda-graph" if graph else ("do_bench" if device.type == "cuda" else "wall clock")
    gemm = samples.pop("gemm", None)
    gemm_rate = None
    if gemm is not None:
        gemm_rate = tflops(calls["gemm"][3], gemm.stats.median)
        extra = calls["gemm"][2]
        results.add("gemm", gemm_provider, shape, extra["dtype"], stats=gemm.stats, kind=kind, tflops=gemm_rate,
                    note=extra["note"], timer=timer)
    peer = samples.get(PEER)
    for provider, s in samples.items():
        _, _, extra, work = calls[provider]
        ms = s.stats.median
        rate, actual = tflops(ns_flops, ms), tflops(work, ms)
        fields = {k: v for k, v in extra.items() if k != "dtype"}
        if peer is not None and provider in BASE_PROVIDERS:
            r = ratio(peer.whole, s.whole)
            fields["vs_torch_optim_muon"] = [r.median, r.low, r.high]
        results.add("newton_schulz", provider, shape, extra["dtype"], stats=s.stats, kind=kind, tflops=rate,
                    actual_tflops=actual, pct_cublas=100 * actual / peak_rate,
                    vs_gemm=None if not gemm_rate else rate / gemm_rate, rel_err_fp64=errors[provider],
                    ns_flops=ns_flops, timer=timer, **fields)


def console_table(rows: list[dict]) -> str:
    """One line per shape, at most 100 columns: the fastest muon backend and torch.optim.Muon."""
    ok = [r for r in rows if r["status"] == "ok" and r["op"] == "newton_schulz"]
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in ok):
        ours = [r for r in ok if r["shape"] == shape and r["provider"] in BASE_PROVIDERS]
        theirs = next((r for r in ok if r["shape"] == shape and r["provider"] == PEER), None)
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median"])
        up = best["extra"].get("vs_torch_optim_muon")
        lines.append({"shape": shape, "kind": best["extra"].get("kind", "")[:12], "best muon": best["provider"][:18],
                      "dtype": best["dtype"][:8], "ms": best["median"], "spread": f"{100 * best['spread']:.0f} %",
                      f"{PEER} ms": theirs and theirs["median"], "speed-up": up and f"{up[0]:.2f}x",
                      "flag": best["flag"] or (theirs or {}).get("flag", "")})
    return fmt_table(lines, list(lines[0])) if lines else "no muon provider ran"
