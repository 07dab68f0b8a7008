"""`python -m bench state-dtype` (issue 30's evidence): rows per seed and state dtype in the bench schema,
with the summary over seeds (a tiny run; the committed figures come from the --quick model)."""

from __future__ import annotations

import json
import math

from bench.cli import main


def test_state_dtype_rows(tmp_path, capsys):
    assert main(["state-dtype", "--quick", "--tokens", "1024", "--batch", "2", "--seeds", "0", "1", "--dtypes",
                 "fp32,int8", "--max-bytes", "200000", "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "state_dtype.json").read_text())
    assert {(r["dtype"], r["extra"]["seed"]) for r in rows} == {("fp32", 0), ("fp32", 1), ("int8", 0), ("int8", 1)}
    for r in rows:
        assert r["op"] == "state_dtype_training" and r["metric"] == "final_val_loss" and math.isfinite(r["median"])
        assert {"seed", "lr", "batch", "tokens", "params", "curve", "summary"} <= set(r["extra"])
    fp32 = [r["median"] for r in rows if r["dtype"] == "fp32"]
    assert math.isclose(rows[0]["extra"]["summary"]["mean"], sum(fp32) / 2) or rows[0]["dtype"] != "fp32"
    assert "int8:" in capsys.readouterr().out
