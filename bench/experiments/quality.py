"""`python -m bench quality`: how close each way of orthogonalizing gets to the polar factor, per FLOP.

    python -m bench quality                  # the committed grid (bench/results/quality-cpu), minutes
    python -m bench quality --quick          # tiny shapes, a few configurations (tests)

For every configuration (algorithm, coefficient preset, steps, preconditioning, compute dtype) and
every input spectrum, NS runs through muon's torch backend (`muon.newton_schulz.orthogonalize`, the
reference every kernel is tested against) and is compared with the float64 polar factor U·Vᵀ of the
same input (float64 SVD):

    rel_err    ‖O − U·Vᵀ‖_F / ‖U·Vᵀ‖_F over the whole spectrum
    sigma_min, sigma_max   extreme singular values of Uₖᵀ·O·Vₖ: the output restricted to the input's
               singular directions with σ >= 1e-3·σ_max (the range NS schedules are built for, Polar
               Express's l = 1e-3; below it no 5-step schedule lifts a direction to 1)
    flops      exact matmul FLOPs, `muon.flops.newton_schulz_flops` (every product full, as the torch
               backend runs it: tests/test_flops.py checks the count against a counted execution)
    flops_vs_keller5   flops / those of 5 Keller steps, standard NS, on the same shape

Spectra (all seeded): Gaussian entries at 1:1 and 1:4; heavy-tailed (Student-t entries, 2 degrees
of freedom: infinite variance, a few huge entries); low-rank plus noise (rank 32, singular values
log-spaced 1 … 1e-2, plus Gaussian noise whose spectral norm is 1e-2 of the top: every direction above
the 1e-3 cut); and real momentum buffers of the GPT experiment model (bench/gpt.py) after a few hundred
Muon steps on the default data, regenerated from their seed on first use and cached under bench/out/
(`capture_momentum`; their checksum goes into the provenance, so a rerun shows whether it reproduced).

The default grid: presets keller, you, polar_express, cans × steps 3, 4, 5 × Frobenius or AOL start ×
bf16, fp16 × standard or Gram NS (Gram on rectangular inputs only), except fp16 standard NS on the
largest input (FULL["skip"]: the run stays at minutes). About 8 TFLOP in all: ~6 minutes on two idle
cores.

Half precision on a CPU: torch's bf16/fp16 CPU GEMMs run at well under 1 GFLOP/s here, so the GEMMs
(bmm/baddbmm) are emulated (`emulated_half_matmuls`): operands are exact in fp32, products accumulate
in fp32 and the result is rounded once to the half dtype — what tensor cores and muon's Triton kernels
do, at the same rounding points as the torch backend; everything else runs natively in the half dtype.
`--native` runs torch's own half GEMMs instead (on CUDA they are native anyway).

AOL is not only a better start: D·G has another polar factor than G unless the rows of G have equal
weight, so converged AOL NS reaches polar(D·G); each spectrum's `aol_target_shift` in the provenance is
‖polar(D·G) − polar(G)‖_F / ‖polar(G)‖_F, the part of an AOL row's error no step count removes.

Output: quality.csv (the columns in COLUMNS, one row per configuration and spectrum), quality.json
(the rows, provenance — commit, versions, device, emulation — and the done-when check of issue 21:
`frontier_check`), quality.png (error against FLOPs, one marker per configuration, a panel per spectrum).
Keller's 5 steps in bf16 (standard, Frobenius start) is the reference row of every panel.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

COLUMNS = ("algorithm", "preset", "steps", "precondition", "dtype", "shape", "spectrum", "rel_err", "sigma_min",
           "sigma_max", "flops", "flops_vs_keller5")
Y_MAX = 1.0  # plot: errors above this (diverged schedules) are drawn on the top edge
SIGMA_CUT = 1e-3  # singular directions of the input kept for sigma_min/max, relative to its largest
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

FULL = dict(
    spectra=["gaussian:1024x1024", "gaussian:1024x4096", "heavy_tailed:512x2048", "low_rank:512x2048", "momentum"],
    presets=["keller", "you", "polar_express", "cans"], steps=[3, 4, 5], preconditions=["frobenius", "aol"],
    dtypes=["bf16", "fp16"], algorithms=["standard", "gram"], momentum=dict(width=256, depth=2, seq_len=64, batch=8,
                                                                           steps=300, lr=0.02),
    # (spectrum, dtype, algorithm) left out to keep the run to minutes: the largest input's fp16 rows
    # cover Gram NS only (the algorithm fp16 is built for, the cheap one at 1:4; fp16 standard NS is
    # measured on every other spectrum)
    skip=[["gaussian:1024x4096", "fp16", "standard"]],
)
QUICK = dict(
    spectra=["gaussian:32x32", "gaussian:32x128", "heavy_tailed:16x64", "low_rank:40x64", "momentum"],
    presets=["keller", "you"], steps=[4, 5], preconditions=["frobenius", "aol"], dtypes=["bf16"],
    algorithms=["standard", "gram"], momentum=dict(width=32, depth=1, seq_len=16, batch=4, steps=20, lr=0.02),
    skip=[],
)
# the done-when check: at these Gaussian shapes, in bf16, some configuration with at most this
# fraction of Keller-5's FLOPs whose error and singular-value range are no worse than Keller-5's
FRONTIER_TARGETS = {"gaussian:1024x1024": 0.8, "gaussian:1024x4096": 0.55}


# ------------------------------------------------------------------------------------ emulation
_HALF = (torch.bfloat16, torch.float16)
_GEMMS = ("aten.bmm.default", "aten.baddbmm.default", "aten.mm.default", "aten.addmm.default")


@contextlib.contextmanager
def emulated_half_matmuls():
    """Inside the block, bf16/fp16 GEMMs compute in fp32 from the (exact) upcast operands and round the
    result once to their dtype: tensor-core arithmetic (fp32 accumulation, one rounding), at the speed
    of the CPU's fp32 GEMM. Other ops and other dtypes run as they are."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Emulate(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(func) in _GEMMS:
                dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
                if len(dtypes) == 1 and (dtype := dtypes.pop()) in _HALF:
                    up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                    return func(*up, **kwargs).to(dtype)
            return func(*args, **kwargs)

    with _Emulate():
        yield


# ------------------------------------------------------------------------------------- spectra
@dataclass
class Spectrum:
    name: str  # e.g. "gaussian:1024x4096" or "momentum:blocks.1.fc.weight"
    G: torch.Tensor  # float64 (m, n)
    polar: torch.Tensor  # float64 U·Vᵀ
    U_k: torch.Tensor  # fp32 (m, k): the input's left singular vectors with σ >= SIGMA_CUT·σ_max
    V_k: torch.Tensor  # fp32 (n, k)
    cond_kept: float  # σ_max / σ_k over the kept part
    aol_shift: float  # ‖polar(D·G) − polar(G)‖_F / ‖polar(G)‖_F, D the AOL scales: the target AOL moves to

    @property
    def shape(self) -> str:
        return f"{self.G.shape[0]}x{self.G.shape[1]}"


def aol_target_shift(G: torch.Tensor, polar: torch.Tensor) -> float:
    """How far AOL moves the target: D·G (D the AOL row scales of the small side, float64) has another
    polar factor than G unless D is a multiple of I; converged NS with AOL reaches polar(D·G), so this
    is the error AOL keeps however many steps run."""
    from muon.backends.torch_backend import aol_scales, normalize
    from muon.coefficients import resolve_schedule

    tall = G.shape[0] > G.shape[1]
    X = G.mT if tall else G
    schedule = resolve_schedule("keller", 1, 1e-7, precondition="aol")
    X0 = normalize(X[None], schedule)[0]
    d = aol_scales((X0 @ X0.mT)[None], schedule)[0]
    U, _, Vh = torch.linalg.svd(d[:, None] * X, full_matrices=False)
    P = U @ Vh
    P = P.mT if tall else P
    return float(torch.linalg.vector_norm(P - polar) / torch.linalg.vector_norm(polar))


def _spectrum(name: str, G: torch.Tensor) -> Spectrum:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    k = int((S >= SIGMA_CUT * S[0]).sum())
    polar = U @ Vh
    return Spectrum(name, G, polar, U[:, :k].float().contiguous(), Vh[:k].mT.float().contiguous(),
                    float(S[0] / S[k - 1]), aol_target_shift(G, polar))


def synthetic(kind: str, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded float64 m×n input of one kind: gaussian, heavy_tailed, low_rank."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "heavy_tailed":
        # Student-t with 2 degrees of freedom: Z / sqrt(chi²_2 / 2), chi²_2 / 2 = -log(U)
        z = torch.randn(m, n, generator=g, dtype=torch.float64)
        u = torch.rand(m, n, generator=g, dtype=torch.float64).clamp_min(1e-300)
        return z / torch.sqrt(-torch.log(u))
    if kind == "low_rank":
        r = min(32, m, n)
        U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
        s = torch.logspace(0, -2, r, dtype=torch.float64)
        noise = torch.randn(m, n, generator=g, dtype=torch.float64)
        noise *= 1e-2 / torch.linalg.matrix_norm(noise, ord=2)
        return (U * s) @ V.mT + noise
    raise ValueError(f"unknown spectrum kind {kind!r}; choose gaussian, heavy_tailed, low_rank or momentum")


def capture_momentum(settings: dict, cache_dir: Path, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Muon momentum buffers of the last block of the GPT experiment model after `settings['steps']`
    steps (bench/gpt.py, byte-level stdlib data, Muon as bench/experiments/efficiency.py builds it, NS in fp32),
    seeded; cached in cache_dir. Returns ({parameter name: float32 matrix}, provenance)."""
    from .. import data as D
    from .. import gpt

    key = hashlib.sha1(json.dumps({**settings, "seed": seed, "torch": torch.__version__}, sort_keys=True).encode())
    path = cache_dir / f"momentum-{key.hexdigest()[:12]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["matrices"], saved["provenance"]
    start = time.perf_counter()
    data = D.load(None, max_bytes=4 * 2**20)
    cfg = gpt.GPTConfig(width=settings["width"], depth=settings["depth"], heads=max(1, settings["width"] // 64),
                        seq_len=settings["seq_len"])
    model = gpt.build(cfg, seed=seed)
    opt = gpt.make_optimizer(model, "muon", settings["lr"], 0.1, ns_dtype=torch.float32)
    history = gpt.train(model, opt, data, batch=settings["batch"], steps=settings["steps"], seed=seed,
                        warmup=max(1, settings["steps"] // 20))
    last = f"blocks.{settings['depth'] - 1}."
    matrices = {}
    for name, p in model.named_parameters():
        if name.startswith(last) and p.ndim == 2:
            matrices[name] = opt.state[p]["momentum_buffer"].detach().float().clone()
    provenance = {"model": gpt.config_dict(cfg), **settings, "seed": seed, "data": data.describe(),
                  "final_val_loss": history["final_val_loss"], "ns": "muon.Muon defaults (Keller 5 steps), fp32",
                  "capture_s": round(time.perf_counter() - start, 1),
                  "checksums": {k: float(v.double().norm()) for k, v in matrices.items()}}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"matrices": matrices, "provenance": provenance}, path)
    return matrices, provenance


def build_spectra(names: list[str], momentum: dict, cache_dir: Path) -> tuple[list[Spectrum], dict]:
    spectra, provenance = [], {}
    for name in names:
        if name == "momentum":
            matrices, provenance["momentum"] = capture_momentum(momentum, cache_dir)
            spectra += [_spectrum(f"momentum:{k}", v.double()) for k, v in matrices.items()]
            continue
        kind, _, shape = name.partition(":")
        m, n = (int(v) for v in shape.split("x"))
        spectra.append(_spectrum(name, synthetic(kind, m, n)))
    return spectra, provenance


# -------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    algorithm: str
    preset: str
    steps: int
    precondition: str
    dtype: str

    @property
    def is_reference(self) -> bool:
        return (self.algorithm, self.preset, self.steps, self.precondition, self.dtype) == (
            "standard", "keller", 5, "frobenius", "bf16")


def configurations(s: dict, spectrum: str, square: bool) -> list[Config]:
    """The grid for one spectrum; Gram NS only on rectangular inputs (on a square one it costs more
    FLOPs than standard NS, 1.2x at 5 steps: never on the frontier); the settings' `skip` entries
    (spectrum, dtype, algorithm) left out. Keller-5 bf16 is always included."""
    skip = {tuple(x) for x in s.get("skip", [])}
    out = [Config("standard", "keller", 5, "frobenius", "bf16")]
    for algorithm in s["algorithms"]:
        if algorithm == "gram" and square:
            continue
        for preset in s["presets"]:
            for steps in s["steps"]:
                for precondition in s["preconditions"]:
                    for dtype in s["dtypes"]:
                        c = Config(algorithm, preset, steps, precondition, dtype)
                        if c not in out and (spectrum, dtype, algorithm) not in skip:
                            out.append(c)
    return out


def measure(spectrum: Spectrum, c: Config, native: bool) -> dict:
    from muon import flops
    from muon.coefficients import resolve_schedule
    from muon.newton_schulz import orthogonalize

    schedule = resolve_schedule(c.preset, c.steps, 1e-7, precondition=c.precondition)
    G = spectrum.G.float()  # the optimizer hands NS fp32 momentum
    emulate = contextlib.nullcontext() if native or G.device.type == "cuda" else emulated_half_matmuls()
    with emulate:
        O = orthogonalize(G, schedule, dtype=DTYPES[c.dtype], backend="torch", algorithm=c.algorithm)
    O64 = O.double()
    rel_err = float(torch.linalg.vector_norm(O64 - spectrum.polar) / torch.linalg.vector_norm(spectrum.polar))
    if not math.isfinite(rel_err):
        sig_min = sig_max = math.nan
    else:
        s = torch.linalg.svdvals(spectrum.U_k.mT @ (O.float() @ spectrum.V_k))  # the cheaper order (m <= n)
        sig_min, sig_max = float(s.min()), float(s.max())
    m, n = spectrum.G.shape
    count = flops.newton_schulz_flops(m, n, c.steps, algorithm=c.algorithm, precondition=c.precondition)
    return {"algorithm": c.algorithm, "preset": c.preset, "steps": c.steps, "precondition": c.precondition,
            "dtype": c.dtype, "shape": spectrum.shape, "spectrum": spectrum.name, "rel_err": rel_err,
            "sigma_min": sig_min, "sigma_max": sig_max, "flops": count,
            "flops_vs_keller5": count / flops.newton_schulz_flops(m, n, 5)}


def no_worse(row: dict, ref: dict) -> bool:
    """Relative error and singular-value range no worse than the reference row's: rel_err <= its,
    sigma_min >= its and sigma_max <= its."""
    return (row["rel_err"] <= ref["rel_err"] and row["sigma_min"] >= ref["sigma_min"]
            and row["sigma_max"] <= ref["sigma_max"])


def frontier_check(rows: list[dict]) -> dict:
    """Per FRONTIER_TARGETS spectrum: the bf16 configurations no worse than Keller-5 bf16 within the
    FLOP budget, cheapest first (the done-when check of issue 21)."""
    out = {}
    for spectrum, budget in FRONTIER_TARGETS.items():
        here = [r for r in rows if r["spectrum"] == spectrum]
        ref = next((r for r in here if Config(r["algorithm"], r["preset"], r["steps"], r["precondition"],
                                               r["dtype"]).is_reference), None)
        if ref is None:
            continue
        ok = sorted((r for r in here if r["dtype"] == "bf16" and r["flops_vs_keller5"] <= budget + 1e-12
                     and no_worse(r, ref)), key=lambda r: (r["flops"], r["rel_err"]))
        out[spectrum] = {"budget_vs_keller5": budget,
                         "keller5": {k: ref[k] for k in ("rel_err", "sigma_min", "sigma_max", "flops")},
                         "passes": bool(ok), "configurations": ok}
    return out


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny shapes and a few configurations (seconds)")
    p.add_argument("--spectra", help="comma-separated: KIND:MxN (gaussian, heavy_tailed, low_rank) or momentum")
    p.add_argument("--presets", help="comma-separated coefficient presets")
    p.add_argument("--steps", help="comma-separated step counts")
    p.add_argument("--preconditions", help="comma-separated: frobenius, aol")
    p.add_argument("--dtypes", help="comma-separated compute dtypes: bf16, fp16, fp32")
    p.add_argument("--algorithms", help="comma-separated: standard, gram")
    p.add_argument("--momentum-steps", type=int, help="training steps before the momentum capture")
    p.add_argument("--native", action="store_true",
                   help="torch's own half-precision CPU GEMMs instead of the fp32-accumulation emulation (slow)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="folder (default bench/out/quality-<device>)")
    p.add_argument("--no-plot", action="store_true")


def _settings(args) -> dict:
    s = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in (QUICK if args.quick else FULL).items()}
    if args.spectra:
        s["skip"] = []  # the skips are for the default spectra
    for key in ("spectra", "presets", "preconditions", "dtypes", "algorithms"):
        value = getattr(args, key)
        if value:
            s[key] = [v.strip() for v in value.split(",") if v.strip()]
    if args.steps:
        s["steps"] = [int(v) for v in args.steps.split(",")]
    if args.momentum_steps:
        s["momentum"]["steps"] = args.momentum_steps
    from muon.backends.dispatch import ALGORITHMS
    from muon.coefficients import PRECONDITIONS, PRESETS

    checks = (("presets", PRESETS), ("preconditions", PRECONDITIONS), ("dtypes", DTYPES),
              ("algorithms", [a for a in ALGORITHMS if a != "auto"]))
    for key, known in checks:
        bad = [v for v in s[key] if v not in known]
        if bad:
            raise SystemExit(f"--{key}: unknown {bad}; choose from {sorted(known)}")
    return s


def run(args) -> int:
    from ..common import REPO, device_name, git_commit, progress, versions

    torch.set_num_threads(args.threads)
    s = _settings(args)
    commit = git_commit()  # of the code that runs, taken before it does
    out = args.out or REPO / "bench" / "out" / ("quality-quick" if args.quick else "quality-cpu")
    start = time.perf_counter()
    spectra, provenance = build_spectra(s["spectra"], s["momentum"], REPO / "bench" / "out" / "quality-cache")
    jobs = [(sp, c) for sp in spectra for c in configurations(s, sp.name, sp.G.shape[0] == sp.G.shape[1])]
    rows = []
    for sp, c in progress(jobs, desc="quality", unit="config"):
        rows.append(measure(sp, c, args.native))
    check = frontier_check(rows)
    meta = {"commit": commit, **{f"{k}_version": v for k, v in versions().items()},
            "device": device_name(torch.device("cpu")), "torch_threads": args.threads,
            "half_gemms": "native torch" if args.native else "emulated: fp32 accumulation of exact upcast operands, "
                          "one rounding to the half dtype per GEMM "
                          "(bench/experiments/quality.py emulated_half_matmuls)",
            "settings": s, "quick": bool(args.quick), "wall_s": round(time.perf_counter() - start, 1),
            "spectra": {sp.name: {"shape": sp.shape, "kept_directions": sp.U_k.shape[1],
                                  "cond_of_kept": sp.cond_kept, "aol_target_shift": sp.aol_shift}
                        for sp in spectra}, **provenance}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "quality.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "quality.json").write_text(json.dumps({"provenance": meta, "frontier_check": check, "rows": rows},
                                                 indent=1, default=str) + "\n")
    if not args.no_plot:
        plot(rows, out / "quality.png", meta)
    for spectrum, r in check.items():
        k = r["keller5"]
        best = r["configurations"][0] if r["configurations"] else None
        verdict = (f"{best['algorithm']} {best['preset']} {best['steps']} steps {best['precondition']}: "
                   f"{best['flops_vs_keller5']:.3f}x FLOPs, rel_err {best['rel_err']:.4f}, "
                   f"sigma [{best['sigma_min']:.3f}, {best['sigma_max']:.3f}]") if best else "none"
        print(f"{spectrum}: Keller-5 bf16 rel_err {k['rel_err']:.4f} sigma [{k['sigma_min']:.3f}, "
              f"{k['sigma_max']:.3f}]; cheapest no-worse bf16 config within {r['budget_vs_keller5']}x: {verdict}")
    print(f"{len(rows)} rows in {meta['wall_s']} s; wrote {out}/quality.csv, quality.json"
          + ("" if args.no_plot else ", quality.png"))
    return 0


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """quality.png: bench.plots.quality (every plot of the bench lives in bench/plots.py)."""
    from .. import plots

    plots.quality(rows, path, meta, y_max=Y_MAX, is_reference=lambda r: Config(
        r["algorithm"], r["preset"], r["steps"], r["precondition"], r["dtype"]).is_reference)
