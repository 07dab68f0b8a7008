"""Optimizer memory (bench/optimizer/memory.py): the counting mode is right on known cases, torch's optimizers
show their known footprints, muon's figures stay under the ceilings below, and `python -m bench
memory` writes rows of the one schema."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench import common as bench_common
from bench import schema
from bench.cli import main
from bench.optimizer import memory

LAYERS, DIM = 16, 256  # 1M parameters: every count below takes a few seconds
# The step stacks a bucket chunk by chunk, each chunk at most muon.Muon's chunk_bytes (16 MiB on a CPU:
# under two 1536x1536 fp32 matrices, so a chunk of 2 matrices of 16 where the model has 16 of
# them). The muon figures below are counted with the chunk scaled the same way (2 of the 16 matrices
# 256x256), so they are the bytes per parameter of that model, measured 40 times faster.
CHUNK_BYTES = 2 * DIM * DIM * 4

# Ceilings, B/param, per configuration of bench/optimizer/memory.py: (resident_max, step_peak_max) from the
# counting mode. resident = what the optimizer keeps between steps, state included; step_peak = the
# extra peak inside a step above what it keeps. Issue 27's targets:
#   kept between steps: Muon <= 4.3, bf16 parameters <= 2.3, AdamW groups <= 8.3 (bf16 <= 4.3)
#   extra peak: atomic Muon (the default) <= 10, foreach=False the same, atomic=False <= 2.0,
#   AdamW groups <= 4.5.
# Each ceiling is the lean step's counted figure plus a margin (the figure in the comment). Lower a
# ceiling when a change lowers the figure; a change that raises one must say why.
CEILINGS = {
    "muon": (4.3, 6.5),  # measured 4.0, 6.0 (before the lean step: 8.0, 20.0)
    # foreach=False: the plan in its smallest chunks (before, the per-parameter loop: 4.0, 28.0)
    "muon-loop": (4.3, 6.5),  # 4.0, 6.0
    "muon-normuon": (4.33, 6.5),  # 4.016 (the per-row second moment), 6.014
    "muon-bf16-params": (2.3, 8.0),  # 2.0, 7.5 (the update and the fp32 work copy of a bucket, 4 + 4)
    # nonfinite="skip": 8.0, 4.5 — the update (4) and one chunk's gradients and next second moment
    # (4.75 before the arithmetic ran in the update's place)
    "muon-adamw": (8.3, 4.6),
    # state_dtype (issue 30's targets: kept <= 2.15 bf16, <= 1.15 int8): the step holds each chunk's
    # momentum read in fp32 and the bucket's next momentum in its stored form until the commit
    "muon-state-bf16": (2.15, 8.5),  # 2.0, 8.0
    "muon-state-int8": (1.15, 7.5),  # 1.016 (one fp32 scale per 256 elements), 7.016
    "muon-adamw-state-bf16": (4.3, 9.0),  # 4.0, 8.75 (the next moments held in bf16 until the commit)
    "muon-adamw-raise": (8.3, 0.3),  # nonfinite="raise": 8.0, 0.0 (torch's fused kernel in place)
    "muon-adamw-loop": (8.3, 4.6),  # foreach=False: 8.0, 4.5 (the loop: 8.0, 13.0)
    "muon-adamw-bf16-params": (4.3, 2.6),  # 4.0, 2.375 (6.25 with the fp32 copies of a whole bucket)
    # atomic=False: every chunk committed as soon as it is computed, its parameters updated member by
    # member in place: one chunk's NS input and Newton–Schulz workspace (X, A, B: four stacks of a
    # chunk of two matrices) at the target of 2.0
    "muon-nonatomic": (4.3, 2.1),  # 4.0, 2.0
}


@pytest.fixture(autouse=True)
def _scaled_chunks(monkeypatch):
    from muon.engine import plan

    monkeypatch.setitem(plan.DEFAULT_CHUNK_BYTES, "cpu", CHUNK_BYTES)


def _per_param(key: str, layers: int = LAYERS, dim: int = DIM) -> dict[str, float]:
    """The counting mode's figures for configuration `key`, B/param."""
    cfg = memory.CONFIGS[key]
    params = memory.make_params(layers, dim, cfg.dtype)
    n = sum(p.numel() for p in params)
    patch = memory.torch_muon_fp32_ns() if key == "torch-muon" else contextlib.nullcontext()
    with patch:
        got = memory.count_step_memory(lambda: memory.build(key, params))
    return {k: v / n for k, v in got.items()}


# ------------------------------------------------------------------------------ the counting mode
def test_counts_a_kept_tensor_and_a_temporary():
    before = torch.zeros(4096)  # from before the block: never counted, not even when written or viewed
    with memory.count_bytes() as got:
        kept = torch.zeros(1024)  # 4 KiB
        tmp = torch.empty(2048)  # 8 KiB, alive at once with kept
        tmp.fill_(1.0)
        before.add_(1.0)
        before.view(64, 64).mul_(2.0)
        del tmp
    assert (got.kept, got.peak) == (4096, 4096 + 8192)
    assert kept.numel() == 1024


def test_a_storage_counts_once_and_lives_while_any_view_does():
    with memory.count_bytes() as got:
        parts = [torch.ones(256) for _ in range(4)]  # 4 x 1 KiB
        stacked = torch.stack(parts)  # 4 KiB more
        del parts
        rows = list(stacked.unbind(0))  # views: nothing new
        del stacked
    assert got.peak == 8192 and got.kept == 4096  # the stack, kept alive by its row views
    rows.clear()


def test_count_step_memory_on_a_known_step():
    class Known(torch.optim.Optimizer):
        """Keeps one fp32 buffer per parameter (4 B/param) and makes a temporary of 3 per step (12 B/param)."""

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state[p]
                    if not state:
                        state["buf"] = torch.zeros_like(p)
                    tmp = torch.empty(3, *p.shape)
                    tmp.copy_(p.grad.expand(3, *p.shape))
                    state["buf"].add_(tmp.sum(0))
                    del tmp  # else it lives on while the next parameter's is made

    params = memory.make_params(2, 64)
    got = memory.count_step_memory(lambda: Known(params, {}))
    n = 2 * 64 * 64
    assert got["resident"] == got["state"] == 4 * n
    # peak: the temporary (12 B/param of one matrix) and its sum (4 B/param of one matrix)
    assert got["step_peak"] == 16 * n // 2


# ------------------------------------------------------------------------- torch's known footprints
@pytest.mark.parametrize(("key", "state", "peak"), [
    ("torch-adamw-foreach", 8.0, 4.0),  # exp_avg, exp_avg_sq; one temporary per parameter (denominators)
    ("torch-adamw-fused", 8.0, 0.0),  # one kernel, nothing around it
    ("torch-muon", 4.0, 1.25),  # momentum; Newton–Schulz temporaries for one matrix at a time (/ 16 matrices)
])  # fmt: skip
def test_torch_optimizers_known_footprints(key, state, peak):
    if memory.skip_reason(key):
        pytest.skip(memory.skip_reason(key))
    got = _per_param(key)
    assert got["state"] == pytest.approx(state, abs=0.01)
    assert got["resident"] == pytest.approx(state, abs=0.01)  # the state is all they keep
    assert got["step_peak"] == pytest.approx(peak, abs=0.3)


# --------------------------------------------------------------------------- muon's ceilings
@pytest.mark.parametrize("key", list(CEILINGS))
def test_muon_memory_under_ceiling(key):
    reason = memory.skip_reason(key)
    if reason:
        pytest.skip(reason)
    resident_max, peak_max = CEILINGS[key]
    got = _per_param(key)
    assert got["state"] <= got["resident"] + 1e-9, "the state is kept between steps"
    assert got["resident"] <= resident_max, f"{key}: kept between steps {got['resident']:.3f} B/param"
    assert got["step_peak"] <= peak_max, f"{key}: extra peak in a step {got['step_peak']:.3f} B/param"


def test_ceilings_cover_every_single_process_muon_configuration():
    single = {k for k, c in memory.CONFIGS.items() if c.kind != "torch" and c.ranks == 1}
    assert set(CEILINGS) == single


def test_counting_agrees_with_rss_on_the_default_configuration():
    """The two methods of bench/optimizer/memory.py agree on muon.Muon's default: within 0.5 B/param on what is
    kept; on the step's peak RSS is at most 0.5 above the count (it also sees BLAS scratch and
    allocator slack) and at most 2.5 below it — the count is the bytes allocated, RSS the pages
    touched, and the bucket's update stack is allocated whole but written chunk by chunk (its rows of
    the later chunks are untouched while the first chunk's stacks are alive)."""
    got = memory.run_config("muon", 8, 1024)
    assert "error" not in got, got
    n = got["params"]
    assert got["resident"] / n == pytest.approx(got["counted"]["resident"] / n, abs=0.5)
    rss, counted = got["step_peak"] / n, got["counted"]["step_peak"] / n
    assert counted - 2.5 <= rss <= counted + 0.5, (rss, counted)


# ------------------------------------------------------------------------------ the command
def test_bench_memory_writes_schema_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")
    assert main(["memory", "--layers", "2", "--dim", "128", "--configs", "muon,torch-adamw-fused,muon-nonatomic",
                 "--out", str(tmp_path)]) == 0
    rows = schema.read(tmp_path / "memory.json")
    assert (tmp_path / "memory.csv").read_text().splitlines()[0] == ",".join(schema.COLUMNS)
    assert len(schema.read(tmp_path / "memory.csv")) == len(rows) == 3 * len(memory.METRICS)
    for r in rows:
        assert list(r) == list(schema.COLUMNS) and r["command"] == "memory" and r["op"] == memory.OP
        assert r["unit"] == "B/param" and r["shape"] == "2x128x128" and r["threads"] == 1
        assert r["spread"] is None and r["rounds"] is None and not r["clock"]  # computed, not timed
    ok = {(r["extra"]["config"], r["metric"]): r for r in rows if r["status"] == "ok"}
    for key in ("muon", "torch-adamw-fused"):
        assert {m for k, m in ok if k == key} == set(memory.METRICS)
        assert ok[(key, "peak_total")]["median"] == pytest.approx(
            ok[(key, "resident")]["median"] + ok[(key, "step_peak")]["median"], abs=0.002)
        assert ok[(key, "resident")]["extra"]["counted"] >= 0 and "counted" not in ok[(key, "state")]["extra"]
    assert ok[("muon", "state")]["median"] == 4.0 and ok[("torch-adamw-fused", "state")]["median"] == 8.0
    assert ok[("muon", "state")]["provider"] == "muon.Muon[torch]"  # bench/optimizer/step_time.py's spelling
    nonatomic = [r for r in rows if r["extra"]["config"] == "muon-nonatomic"]
    if memory.has_atomic_option():
        assert all(r["status"] == "ok" for r in nonatomic)
    else:
        assert all(r["status"].startswith("skipped:") and "atomic" in r["status"] for r in nonatomic)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines() if not line.startswith("wrote")) <= bench_common.CONSOLE_WIDTH
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_headline_reads_the_memory_rows():
    from bench.run_all import memory_headline

    results = schema.Results(torch.device("cpu"), "memory")
    for metric, value in (("state", 4.0), ("resident", 8.26), ("step_peak", 19.98), ("peak_total", 28.24)):
        results.add(memory.OP, "muon.Muon[torch]", "8x1024x1024", "float32", metric=metric, unit=memory.UNIT,
                    value=value, config="muon")
    results.add(memory.OP, "muon.Muon(atomic=False)[torch]", "8x1024x1024", "float32", metric="resident",
                unit=memory.UNIT, status="skipped: no atomic argument", config="muon-nonatomic")
    lines = memory_headline(results.rows)
    assert "| muon | float32 | 8.26 | 19.98 | 28.24 |" in lines
    assert not any("muon-nonatomic" in line for line in lines)
    assert memory_headline([]) == []


def test_bench_memory_unknown_config():
    with pytest.raises(SystemExit, match="--configs: unknown configuration 'nope'"):
        main(["memory", "--configs", "muon,nope", "--out", "/nonexistent"])
