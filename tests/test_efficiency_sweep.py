"""`python -m bench efficiency --preset cpu|gpu` plumbing: the plan a cache asks for (grid, extension
beyond an edge, seeds), resuming from runs.jsonl, the end-of-decay reading of R(B) on a synthetic cache,
the critical batch fit, and warmup-stable-decay branches equal to separate runs. No timings."""

from __future__ import annotations

import json
import math

import pytest

from bench import gpt as G
from bench.cli import main
from bench.experiments import efficiency_sweep as E

SMALL_DATA = ["--max-bytes", str(2**18)]


def _settings(**over):
    s = {**E.COMMON, **E.CPU, "batches": [4, 16], "muon_lrs": [0.01, 0.02, 0.04], "adamw_lrs": [0.001, 0.002, 0.004],
         "seeds": 3, "data": None, "max_bytes": 2**18, "max_extensions": 2}
    s.update(over)
    return s


def _run(s, batch, name, lr, seed, curve):
    steps = E.steps_of(s, batch)
    lengths = E.run_lengths(steps, len(curve))
    return {"config": E.run_config(s), "batch": batch, "optimizer": name, "lr": lr, "seed": seed, "steps": steps,
            "lengths": lengths, "tokens": [n * batch * s["seq_len"] for n in lengths], "decayed": list(curve),
            "stable": list(curve), "params": 1000, "wall_s": 1.0}


def _put(done, run):
    done[(run["batch"], run["optimizer"], E.lr_key(run["lr"]), run["seed"])] = run


def _curve(final, n=9):
    return [final + 0.1 * (n - 1 - i) for i in range(n)]  # falls by 0.1 per length, ends at `final`


def test_plan_grid_then_extension_then_seeds():
    s = _settings(batches=[4])
    done = {}
    assert sorted(j[2] for j in E.plan(s, done) if j[1] == "muon") == [0.01, 0.02, 0.04]
    assert {j[3] for j in E.plan(s, done)} == {0}
    # muon's best on the upper edge: one more lr beyond it, nothing else for muon yet
    for lr, final in ((0.01, 2.0), (0.02, 1.9), (0.04, 1.8)):
        _put(done, _run(s, 4, "muon", lr, 0, _curve(final)))
    assert [j for j in E.plan(s, done) if j[1] == "muon"] == [(4, "muon", 0.08, 0)]
    _put(done, _run(s, 4, "muon", 0.08, 0, _curve(1.85)))
    assert [j for j in E.plan(s, done) if j[1] == "muon"] == [(4, "muon", 0.04, 1), (4, "muon", 0.04, 2)]
    st = E.grid_state(s, done, 4, "muon")
    assert st["best"] == 0.04 and not st["at_edge"] and st["above"] == 1 and st["below"] == 0
    # adamw keeps improving downward: extended at most max_extensions times, then seeds at the edge
    for lr, final in ((0.001, 1.5), (0.002, 1.6), (0.004, 1.7), (0.0005, 1.4), (0.00025, 1.3)):
        _put(done, _run(s, 4, "adamw", lr, 0, _curve(final)))
    st = E.grid_state(s, done, 4, "adamw")
    assert st["best"] == 0.00025 and st["at_edge"] and st["next"] is None and st["below"] == 2
    assert [j for j in E.plan(s, done) if j[1] == "adamw"] == [(4, "adamw", 0.00025, 1), (4, "adamw", 0.00025, 2)]


def test_plan_treats_diverged_runs_as_worst():
    s = _settings(batches=[4])
    done = {}
    for lr, final in ((0.01, 1.7), (0.02, 1.6), (0.04, math.inf)):
        _put(done, _run(s, 4, "muon", lr, 0, _curve(final)))
    st = E.grid_state(s, done, 4, "muon")
    assert st["best"] == 0.02 and st["next"] is None and not st["at_edge"]


def test_cache_resume_skips_other_settings_and_cut_lines(tmp_path):
    s = _settings()
    path = tmp_path / "runs.jsonl"
    E.append_run(path, _run(s, 4, "muon", 0.01, 0, _curve(2.0)))
    E.append_run(path, {**_run(s, 4, "muon", 0.02, 0, _curve(2.0)), "config": {**E.run_config(s), "width": 32}})
    with path.open("a") as f:
        f.write('{"config": {"width"')  # a write cut short
    done = E.load_cache(path, s)
    assert list(done) == [(4, "muon", "0.01", 0)]
    assert (4, "muon", 0.01, 0) not in E.plan(s, done) and (4, "muon", 0.02, 0) in E.plan(s, done)


def test_tokens_to_reads_end_of_decay_points_in_log_tokens():
    tokens, losses = [100, 400, 1600], [3.0, 2.0, 1.0]
    assert E.tokens_to(tokens, losses, 2.0) == (pytest.approx(400), "interpolated")
    assert E.tokens_to(tokens, losses, 1.5) == (pytest.approx(800), "interpolated")  # halfway in log tokens
    assert E.tokens_to(tokens, losses, 3.5) == (100, "at most")
    assert E.tokens_to(tokens, losses, 0.5) == (math.inf, "not reached")
    assert E.tokens_to(tokens, [3.0, 1.5, 1.6], 1.55)[0] < 400  # running minimum: a later bump is ignored


def test_analyze_reads_r_per_seed_on_a_synthetic_cache():
    s = _settings(batches=[4, 16], seeds=2)
    done = {}
    # muon is 2 lengths (a factor 2 in tokens) ahead of adamw on every curve; the best lr is the middle one
    for batch in (4, 16):
        for name, lrs, shift in (("muon", (0.01, 0.02, 0.04), 0.2), ("adamw", (0.001, 0.002, 0.004), 0.0)):
            for lr in lrs:
                worse = 0.0 if lr in (0.02, 0.002) else 0.3
                for seed in (0, 1) if worse == 0.0 else (0,):
                    curve = [3.0 - 0.1 * i - shift + worse for i in range(9)]
                    _put(done, _run(s, batch, name, lr, seed, curve))
    assert E.plan(s, done) == []
    res = E.analyze(s, done)
    assert res["complete"] and res["params"] == 1000
    for row in res["batches"]:
        assert row["muon"]["best_lr"] == 0.02 and row["adamw"]["best_lr"] == 0.002
        assert row["target_loss"] == pytest.approx(2.2)  # adamw's final: the worse of the two
        assert [p["ratio"] for p in row["per_seed"]] == [pytest.approx(2.0)] * 2
        assert row["ratio_mean"] == pytest.approx(2.0) and row["ratio_sd"] == pytest.approx(0.0)
        assert row["ratio_envelope_seed0"] == pytest.approx(2.0)
        assert row["per_seed"][0]["adamw_tokens"] == pytest.approx(row["adamw"]["tokens"][-1])


def test_fit_critical_recovers_e_min_and_b_crit():
    bs = [256, 1024, 4096, 16384]
    fit = E.fit_critical(bs, [1e6 * (1 + b / 2000) for b in bs])
    assert fit["e_min"] == pytest.approx(1e6) and fit["b_crit"] == pytest.approx(2000) and fit["bracketed"]
    assert not E.fit_critical(bs, [1e6 * (1 + b / 1e6) for b in bs])["bracketed"]


def test_wsd_branches_equal_separate_runs():
    import bench.data as D

    data = D.load(max_bytes=2**18)
    cfg = G.GPTConfig(width=16, depth=1, heads=2, seq_len=16)

    def go(lengths):
        model = G.build(cfg, seed=3)
        opt = G.make_optimizer(model, "muon", 0.02, 0.1)
        return G.train_wsd(model, opt, data, batch=2, lengths=lengths, warmup=2, seed=3, val_count=1)

    both, alone = go([6, 12]), go([6])
    assert both["lengths"] == [6, 12] and both["decayed"][0] == alone["decayed"][0]
    assert go([12])["decayed"] == both["decayed"][1:]  # the branch leaves the main run untouched
    assert G.wsd_multiplier(1, 10, 2, 0.2) == 0.5 and G.wsd_multiplier(8, 10, 2, 0.2) == 1.0
    assert G.wsd_multiplier(10, 10, 2, 0.2) == pytest.approx(1 / 3)


def test_preset_cli_tiny_resumes_from_its_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUON_BENCH_QUIET", "1")
    out = tmp_path / "sweep"
    argv = ["efficiency", "--preset", "cpu", "--width", "16", "--depth", "1", "--head-dim", "8", "--seq-len", "16",
            "--batches", "2", "8", "--tokens", "512", "--muon-lrs", "0.01", "0.02", "0.04", "--adamw-lrs", "0.002",
            "0.004", "0.008", "--val-count", "1", "--seeds", "2", "--workers", "1", "--max-extensions", "1",
            "--no-plot", "--out", str(out), "--json", *SMALL_DATA]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert res["runs"] == len(lines) >= 2 * 2 * 3 + 4
    for row in res["batches"]:
        assert len(row["per_seed"]) == 2
        assert row["ratio_mean"] == pytest.approx(sum(p["ratio"] for p in row["per_seed"]) / 2)
        for name in ("muon", "adamw"):
            assert len(row[name]["sweep"]) >= 3 and row[name]["best_lr"] in [r["lr"] for r in row[name]["sweep"]]
    rows = json.loads((out / "efficiency.json").read_text())
    assert {"seed", "lr", "best", "tokens", "params"} <= set(rows[0]["extra"])
    assert all({"seed", "lr", "best", "tokens", "params"} <= set(r["extra"]) for r in rows)
    assert main(argv) == 0  # everything cached: nothing is run again
    assert (out / "runs.jsonl").read_text().splitlines() == lines
    assert json.loads(capsys.readouterr().out)["batches"] == res["batches"]


def test_preset_rejects_tokens_that_do_not_divide(tmp_path):
    with pytest.raises(SystemExit, match="multiple"):
        main(["efficiency", "--preset", "cpu", "--tokens", "1000", "--out", str(tmp_path), *SMALL_DATA])


def test_tokens_to_after_diverged_shorter_runs_and_one_step_branch():
    assert E.tokens_to([10, 20, 40], [math.inf, 2.0, 1.0], 1.5) == (pytest.approx(40 / math.sqrt(2)), "interpolated")
    assert E.tokens_to([10, 20, 40], [math.inf, 2.0, 1.0], 2.5) == (20.0, "at most")
    assert G.decay_starts([1, 5], 0.2) == {0: 1, 4: 5}
