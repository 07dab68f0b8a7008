"""The framework recipes of docs/recipes.md, run as written: transformers' Trainer (GPT-2 and LLaMA from
configs, checkpoint and resume through the Trainer), Lightning's configure_optimizers, and a plain loop
with a schedule, clipping, autocast and a checkpoint. Each checks that the loss falls and that resuming
gives the same bits as training through.

A missing framework skips with what to install outside CI and fails in CI and under `make test`
(tests/docblocks.py, `require`).
"""

from __future__ import annotations

import torch
from docblocks import block, blocks, one_thread, require, run  # noqa: F401 (one_thread: autouse)

import muon

PAGE = "docs/recipes.md"
HEADINGS = ("transformers' `Trainer`", "PyTorch Lightning", "A plain loop")
TRANSFORMERS = "'fused-muon[test]' (or pip install transformers accelerate)"


def _fell(losses: list[float], by: float) -> bool:
    """The loss fell: the mean of the last quarter is `by` below the first loss."""
    tail = losses[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail) < losses[0] - by


def test_every_recipe_block_is_run_here():
    assert [b.heading for b in blocks(PAGE)] == [block(PAGE, h).heading for h in HEADINGS]


def test_trainer_gpt2_and_llama_train_and_resume_bit_for_bit():
    require("transformers", TRANSFORMERS)
    require("accelerate", TRANSFORMERS)
    results = run(block(PAGE, HEADINGS[0]))["results"]
    assert set(results) == {"gpt2", "llama"}
    for name, result in results.items():
        losses = result["losses"]
        assert len(losses) == 20, name
        assert _fell(losses, 0.15), (name, losses)
        assert result["resumed_bit_for_bit"], name


def test_lightning_configure_optimizers_trains():
    require("lightning", "'fused-muon[test]' (or pip install lightning)")
    scope = run(block(PAGE, HEADINGS[1]))
    losses = scope["model"].losses
    assert len(losses) == 20 and _fell(losses, 0.3), losses
    opt = scope["trainer"].optimizers[0]
    assert isinstance(opt, muon.Muon) and [g["use_muon"] for g in opt.param_groups] == [True, False]


def test_plain_loop_with_schedule_clipping_autocast_resumes_bit_for_bit():
    scope = run(block(PAGE, HEADINGS[2]))
    assert _fell(scope["losses"], 0.2), scope["losses"]
    assert scope["same"]
    # the schedule scales each kind of group's own lr (Muon's 0.02, AdamW's 3e-3), down to 0 at the end
    schedule = scope["schedule"]
    assert schedule.base_lrs == [0.02, 3e-3] and schedule.get_last_lr() == [0.0, 0.0]


def test_conv1d_gets_the_transposed_linear_update_with_match_rms_adamw():
    """Conv1D weights are (in, out): even in a group without transposed=True (docs/optimizer.md,
    "Weights stored (in, out)"), the symmetric match_rms_adamw scale gives plain Muon exactly the
    transposed nn.Linear's update (tests/test_transposed.py covers every other setting, with the
    orientation known)."""
    require("transformers", TRANSFORMERS)
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 32)  # 32 inputs, 96 outputs: weight (32, 96)
    linear = torch.nn.Linear(32, 96)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    optimizers = [muon.Muon([layer.weight], lr=0.02, adjust_lr_fn="match_rms_adamw") for layer in (conv, linear)]
    for _ in range(5):
        x = torch.randn(8, 32)
        for layer, opt in zip((conv, linear), optimizers):
            layer(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(conv.weight.T, linear.weight, rtol=0, atol=1e-6)
