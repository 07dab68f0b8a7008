"""The experiments' pieces (byte data, small GPT, tokens-to-target) and both CLIs on tiny settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import data as D
from bench import gpt as G
from bench.cli import main
from bench.experiments.efficiency import tokens_to_reach

SMALL_DATA = ["--max-bytes", str(2**18)]


def test_stdlib_data_is_deterministic_and_split_by_file():
    a, b = D.load(max_bytes=2**18), D.load(max_bytes=2**18)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.dtype == torch.uint8 and a.source.startswith("python-stdlib:")
    n = a.train.numel() + a.val.numel()
    # each split gets its share of the cap (plus one separator byte per file joined)
    assert 2**18 <= n <= 2**18 + 200
    assert int(2**18 * 0.1) <= a.val.numel() <= int(2**18 * 0.1) + 100
    assert b"def " in bytes(a.train[:100000].tolist()) and b"import" in bytes(a.val.tolist())
    # validation files are not in train: a long validation window never appears in the training bytes
    window = bytes(a.val[1000:1200].tolist())
    assert window not in bytes(a.train.tolist())


def test_user_file_split_and_batches(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 8)
    d = D.load(str(path), val_fraction=0.25)
    assert d.train.numel() == 1536 and d.val.numel() == 512
    assert torch.equal(d.train[:256], torch.arange(256, dtype=torch.uint8))
    x, y = D.sample_batch(d.train, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    assert torch.equal((x + 1) % 256, y)  # the file counts up, so each target is input + 1
    vb = D.val_batches(d.val, 4, 16, 3)
    assert len(vb) == 3 and all(v[0].shape == (4, 16) for v in vb)
    with pytest.raises(ValueError, match="val_fraction"):
        D.load(str(path), val_fraction=1.5)


def test_gpt_shapes_params_and_bad_config():
    cfg = G.GPTConfig(width=32, depth=2, heads=4, seq_len=16)
    model = G.build(cfg, seed=1)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 256)
    assert abs(loss.item() - math.log(256)) < 0.1  # a fresh model predicts nearly uniform bytes
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "emb" not in n)
    assert cfg.matmul_params() == matrices
    # causal: changing a later byte does not change earlier logits
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 256
    torch.testing.assert_close(model(idx2)[:, :10], model(idx)[:, :10])
    with pytest.raises(ValueError, match="heads"):
        G.GPTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="optimizer"):
        G.make_optimizer(model, "sgd", 0.1, 0.0)


def test_training_is_deterministic_under_a_seed():
    data = D.load(max_bytes=2**18)
    cfg = G.GPTConfig(width=32, depth=1, heads=2, seq_len=16)
    runs = []
    for _ in range(2):
        model = G.build(cfg, seed=3)
        opt = G.make_optimizer(model, "muon", 0.01, 0.1)
        runs.append(G.train(model, opt, data, batch=4, steps=4, seed=3, eval_every=2, val_count=1, val_batch=4))
    assert runs[0] == runs[1] and len(runs[0]["val_loss"]) == 2


def test_tokens_to_reach():
    tokens, losses = [100, 200, 300], [4.0, 3.0, 3.5]
    assert tokens_to_reach(tokens, losses, 3.5, (0, 5.0)) == pytest.approx(150.0)  # interpolated
    assert tokens_to_reach(tokens, losses, 4.5, (0, 5.0)) == pytest.approx(50.0)  # before the first eval
    assert tokens_to_reach(tokens, losses, 3.0, (0, 5.0)) == pytest.approx(200.0)
    assert tokens_to_reach(tokens, losses, 2.9, (0, 5.0)) == math.inf
    # the running minimum: a later bump does not un-reach a target
    assert tokens_to_reach([1, 2, 3], [3.0, 4.0, 2.0], 3.0, (0, 5.0)) == pytest.approx(1.0)


def test_telescope_cli_tiny(tmp_path, capsys):
    out = tmp_path / "tel"
    argv = ["telescope", "--quick", "--base-width", "16", "--final-width", "32", "--n0", "2", "--steps", "2",
            "--depth", "1", "--seq-len", "16", "--batch", "2", "--head-dim", "8", "--out", str(out), "--json",
            "--max-extensions", "0", *SMALL_DATA]  # a 2x2 grid has no inside: the paper's schedule as it is
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [st["width"] for st in res["stages"]] == [16, 32]
    assert [st["extensions"] for st in res["stages"]] == [0, 0]
    assert [len(st["grid"]) for st in res["stages"]] == [4, 1]  # 2x2, then 2·4^(-1/2) = 1 -> 1
    assert res["stages"][1]["center"] == res["stages"][0]["best"]["point"]
    assert res["best"] == res["stages"][-1]["best"] and set(res["best"]["values"]) == {"lr", "weight_decay"}
    flops = [G.GPTConfig(width=w, depth=1, heads=w // 8, seq_len=16).flops_per_token() for w in (16, 32)]
    assert res["cost_ratio_vs_brute_force"] == pytest.approx((4 * flops[0] + flops[1]) / (4 * flops[1]))
    assert (out / "telescope.json").exists() and (out / "telescope.png").stat().st_size > 0
    assert all(math.isfinite(e["loss"]) for st in res["stages"] for e in st["grid"])


def test_efficiency_cli_tiny(tmp_path, capsys):
    out = tmp_path / "eff"
    argv = ["efficiency", "--quick", "--width", "16", "--depth", "1", "--head-dim", "8", "--seq-len", "16",
            "--batches", "2", "4", "--tokens", "256", "--lrs", "0.003", "0.01", "--evals", "4", "--val-count", "1",
            "--out", str(out), "--json", *SMALL_DATA]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["batch_tokens"] for r in res["batches"]] == [32, 64]
    for r in res["batches"]:
        assert {"batch_tokens", "muon_tokens", "adamw_tokens", "token_ratio"} <= set(r)
        assert 0 < r["muon_tokens"] <= 256 and 0 < r["adamw_tokens"] <= 256  # the common target is reachable
        assert r["token_ratio"] == pytest.approx(r["adamw_tokens"] / r["muon_tokens"])
        assert r["target_loss"] == max(r["muon"]["final_val_loss"], r["adamw"]["final_val_loss"])
        for name in ("muon", "adamw"):
            assert r[name]["best_lr"] in (0.003, 0.01)
            assert r[name]["final_val_loss"] == min(s["final_val_loss"] for s in r[name]["sweep"])
    assert (out / "efficiency.json").exists() and (out / "efficiency.png").stat().st_size > 0


def test_cli_rejects_bad_settings(tmp_path):
    with pytest.raises(SystemExit, match="head-dim"):
        main(["efficiency", "--quick", "--width", "30", "--out", str(tmp_path), *SMALL_DATA])
    with pytest.raises(SystemExit):
        main(["telescope", "--quick", "--hparam", "momentum=0.9", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="power of 2"):
        main(["telescope", "--quick", "--base-width", "16", "--final-width", "48", "--head-dim", "8",
              "--steps", "1", "--out", str(tmp_path), *SMALL_DATA])
