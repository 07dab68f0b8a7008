"""`muon.mup`: the maximal-update parametrization (muP) for a model trained with Muon + AdamW.

Hyperparameters tuned on a narrow model (the *base width*) carry over to a wide one when the
multipliers, initial variances and per-layer learning rates follow the table below (Essential AI,
"Practical Efficiency of Muon for Pretraining", after Yang et al.), with fan_in / fan_out the
parameter's own fans (nn.Linear (out, in): fan_out = out; nn.Embedding (num, dim): fan_out = dim):

    |                     | input weights & biases | output weights | hidden weights   |
    |---------------------|------------------------|----------------|------------------|
    | multiplier          | sqrt(fan_out)          | 1/sqrt(fan_in) | 1                |
    | init variance       | 1/fan_out              | 1/fan_in       | 1/fan_in         |
    | learning-rate scale | 1/sqrt(fan_out)        | 1/sqrt(fan_in) | 1/fan_in (AdamW) |

Learning-rate scales are applied *relative to the base width* (lr · scale(width) / scale(base)), so
the learning rate you pass is exactly the one used at the base width, and is the one to transfer.
Multipliers and initial variances are absolute: they make every coordinate of the embedding output
Θ(1) and the logits' initial part O(1/sqrt(width)) at any width.

Which Muon update scale it pairs with: ``adjust_lr_fn="spectral"``, s(m, n) = sqrt(m/n).
muP asks that a hidden layer's update move its output coordinates by Θ(1), i.e. that the update's
spectral norm be Θ(sqrt(fan_out/fan_in)) (Yang, Simon & Bernstein's spectral condition). Newton–Schulz
returns an (approximately) orthogonal matrix, spectral norm ≈ 1 at every width, so lr·sqrt(m/n)·O
meets the condition with a width-independent lr: the hidden Muon learning-rate scale is 1. The
table's 1/fan_in for hidden weights is AdamW's rule: an AdamW update has Θ(1) entries and is
effectively low rank, so its spectral norm grows like fan_in; it applies here only to hidden matrices
that are routed to AdamW. "original" (sqrt(max(1, m/n))) differs from "spectral" only by a factor
that depends on the aspect ratio m/n, which stays fixed as a model widens, so it transfers too (with
a different optimal lr). "match_rms_adamw" (0.2·sqrt(max(m, n))) grows the spectral norm like
sqrt(width); `param_groups` compensates with a Muon lr scale sqrt(base/width) so it also transfers.
Any mode is handled by `muon_lr_scale`, which keeps lr·s(m, n) / sqrt(m/n) constant across widths.

Input and output weights always go to AdamW (the table's scales are AdamW's); biases and norm gains
of hidden layers are "vector" parameters with multiplier 1, their usual init, and lr scale 1 (their
coordinates are Θ(1) already, which is what the input column produces for an input layer).
Weight decay is decoupled and multiplied by each group's lr, as in torch.optim.AdamW and Muon.

Usage on your own nn.Module::

    model = MyModel(width=1024)
    muon.mup.apply(model, input=["tok_emb", "pos_emb"], output=["lm_head"])   # hooks + init
    groups = muon.mup.param_groups(model, base_width=256, width=1024, lr=0.02, adamw_lr=3e-3)
    opt = muon.Muon(groups, weight_decay=0.1)

With attention, use `attention_scale(head_dim, base_head_dim)` in place of 1/sqrt(head_dim) when
the head dimension grows with width (muP's 1/head_dim rule); with a fixed head dimension (more heads
as width grows) the usual 1/sqrt(head_dim) is already width-independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from ._shapes import matrix_shape
from .optim import update_scale
from .param_groups import HEAD_NAMES, stores_transposed
from .param_groups import param_groups as _base_param_groups

ROLES = ("input", "hidden", "output", "vector")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


# ------------------------------------------------------------------------------------------ roles
def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pat) for pat in patterns)


def _check_widths(base_width: int, width: int) -> float:
    for label, value in (("base_width", base_width), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    return width / base_width


def io_modules(
    model: nn.Module, input: Sequence[str] | None = None, output: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Qualified names of the model's input and output modules.

    `input` / `output` are fnmatch patterns over module names (as in model.named_modules()); left as
    None, input modules are the embeddings (nn.Embedding/EmbeddingBag or a name containing "embed")
    and output modules are those whose last name component marks a head (lm_head, head, output,
    classifier, logits; the names `muon.param_groups` routes to AdamW).
    """
    ins, outs = [], []
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        last = name.rsplit(".", 1)[-1].lower()
        is_in = _matches(name, input) if input is not None else isinstance(module, _EMBEDDINGS) or "embed" in last
        is_out = _matches(name, output) if output is not None else last in HEAD_NAMES
        if is_in and is_out:
            raise ValueError(f"module {name!r} is both an input and an output module; pass `input`/`output` patterns")
        if is_in:
            ins.append(name)
        elif is_out:
            outs.append(name)
    if input is not None and not ins:
        raise ValueError(f"input patterns {list(input)!r} match no module with parameters")
    if output is not None and not outs:
        raise ValueError(f"output patterns {list(output)!r} match no module with parameters")
    return ins, outs


def fans(module: nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight: nn.Embedding (num, dim) maps num -> dim, and so does transformers'
    Conv1D (in, out); otherwise (out, in, ...)."""
    if isinstance(module, _EMBEDDINGS) or (stores_transposed(module) and weight.ndim == 2):
        return weight.shape[0], weight.shape[1]
    if weight.ndim < 2:
        return 1, weight.shape[0]
    return math.prod(weight.shape[1:]), weight.shape[0]


def roles(
    model: nn.Module, input: Sequence[str] | None = None, output: Sequence[str] | None = None
) -> dict[str, str]:
    """The muP role of every parameter (qualified name -> "input" | "hidden" | "output" | "vector").

    Input modules' weights *and* biases are "input" (the table's first column); an output module's
    weight is "output" and its bias "vector"; other >= 2-D tensors are "hidden"; other 0-/1-D
    tensors (biases, norm gains) are "vector". A parameter shared by several modules takes the role
    of its first name; tying an input to an output weight is rejected (their rules conflict).
    """
    ins, outs = io_modules(model, input, output)
    owner_role: dict[int, str] = {}
    for name, module in model.named_modules():
        role = "input" if name in ins else "output" if name in outs else None
        if role is None:
            continue
        for pname, p in module.named_parameters(recurse=False):
            r = "input" if role == "input" else ("output" if pname == "weight" or p.ndim >= 2 else "vector")
            if owner_role.get(id(p), r) != r:
                raise ValueError(
                    f"parameter of module {name!r} is shared by an input and an output module; untie them for muP"
                )
            owner_role[id(p)] = r
    out = {}
    for name, p in model.named_parameters():
        out[name] = owner_role.get(id(p), "hidden" if p.ndim >= 2 else "vector")
    return out


# ------------------------------------------------------------------------- multipliers and init
def multiplier(role: str, fan_in: int, fan_out: int) -> float:
    """The forward multiplier of the table: input sqrt(fan_out), output 1/sqrt(fan_in), else 1."""
    if role == "input":
        return math.sqrt(fan_out)
    if role == "output":
        return 1.0 / math.sqrt(fan_in)
    if role in ("hidden", "vector"):
        return 1.0
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def init_std(role: str, fan_in: int, fan_out: int) -> float:
    """The initial standard deviation of the table: input 1/sqrt(fan_out), hidden/output 1/sqrt(fan_in)."""
    if role == "input":
        return 1.0 / math.sqrt(fan_out)
    if role in ("hidden", "output"):
        return 1.0 / math.sqrt(fan_in)
    raise ValueError(f"init_std is defined for input, hidden and output weights, got role {role!r}")


def _input_hook(scale: float) -> Callable:
    def hook(module, args, out):
        return out * scale

    return hook


def _output_hook(scale: float) -> Callable:
    # The multiplier acts on the weight only: out = scale·(W x) + b.
    def hook(module, args, out):
        bias = getattr(module, "bias", None)
        if bias is None:
            return out * scale
        return (out - bias) * scale + bias

    return hook


@torch.no_grad()
def apply(
    model: nn.Module,
    *,
    input: Sequence[str] | None = None,
    output: Sequence[str] | None = None,
    init: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, str]:
    """Make `model` a muP model in place: forward multipliers on input/output modules, and muP init.

    Multipliers are forward hooks (the parameters and their names stay as they are, so
    `muon.param_groups` routes them as before): an input module's output is multiplied by
    sqrt(fan_out), an output module's W·x by 1/sqrt(fan_in). With init=True, input, hidden and output
    weights are drawn from N(0, table variance); input biases are zeroed; other biases and norm gains
    keep their init. Call it once, after building the model and before creating the optimizer.
    Returns the role of every parameter (see `roles`).
    """
    if getattr(model, "_muon_mup_applied", False):
        raise RuntimeError("muon.mup.apply was already called on this model")
    role_of = roles(model, input, output)
    ins, outs = io_modules(model, input, output)
    for name in ins + outs:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            raise ValueError(f"muP input/output module {name!r} needs a >= 2-D `weight`")
        fan_in, fan_out = fans(module, weight)
        if name in ins:
            module.register_forward_hook(_input_hook(multiplier("input", fan_in, fan_out)))
        else:
            module.register_forward_hook(_output_hook(multiplier("output", fan_in, fan_out)))
    if init:
        owners = {}
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), (module, pname))
        for name, p in model.named_parameters():
            role = role_of[name]
            module, pname = owners[id(p)]
            if role == "vector":
                continue
            if role == "input" and p.ndim < 2:
                p.zero_()
                continue
            fan_in, fan_out = fans(module, p)
            p.normal_(0.0, init_std(role, fan_in, fan_out), generator=generator)
    model._muon_mup_applied = True
    return role_of


def attention_scale(head_dim: int, base_head_dim: int) -> float:
    """Softmax scale for q·k: 1/sqrt(head_dim) at the base, then muP's 1/head_dim as it grows.

    Equals 1/sqrt(base_head_dim) · base_head_dim/head_dim, so nothing changes at the base width.
    """
    _check_widths(base_head_dim, head_dim)
    return math.sqrt(base_head_dim) / head_dim


# ---------------------------------------------------------------------------- learning rates
def adamw_lr_scale(role: str, ratio: float) -> float:
    """AdamW lr scale relative to the base width, for width = ratio·base_width.

    input and output weights 1/sqrt(ratio) (the table's 1/sqrt(fan)), hidden 1/ratio (1/fan_in),
    vector parameters 1.
    """
    if role in ("input", "output"):
        return 1.0 / math.sqrt(ratio)
    if role == "hidden":
        return 1.0 / ratio
    if role == "vector":
        return 1.0
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def muon_lr_scale(adjust_lr_fn, m: int, n: int, ratio: float) -> float:
    """Muon lr scale for a hidden m×n matrix at width = ratio·base_width (its base shape m/r × n/r).

    Keeps the update's spectral norm, lr·s(m, n) (NS output has spectral norm ≈ 1), proportional to
    sqrt(m/n), the muP spectral condition: scale = [s(m0, n0)/s(m, n)]·[sqrt(m/n)/sqrt(m0/n0)].
    "spectral" and "original" give exactly 1; "match_rms_adamw" gives 1/sqrt(ratio).
    """
    m0, n0 = m / ratio, n / ratio
    return (update_scale(adjust_lr_fn, m0, n0) / update_scale(adjust_lr_fn, m, n)) * math.sqrt((m / n) / (m0 / n0))


def param_groups(
    model: nn.Module,
    base_width: int,
    width: int,
    *,
    lr: float,
    adamw_lr: float | None = None,
    weight_decay: float | None = None,
    adjust_lr_fn: str | Callable | None = "spectral",
    input: Sequence[str] | None = None,
    output: Sequence[str] | None = None,
    muon: Sequence[str] = (),
    adamw: Sequence[str] = (),
    muon_options: dict | None = None,
    adamw_options: dict | None = None,
) -> list[dict]:
    """`muon.param_groups` with muP learning rates: hyperparameters tuned at base_width transfer to width.

    Routing is `muon.param_groups`' (hidden matrices to Muon, the rest to AdamW), except that input and
    output modules' parameters always go to AdamW. Every group gets its own "lr" (the base lr times
    the muP scale at this width, see `adamw_lr_scale` / `muon_lr_scale`), "mup_role" and
    "mup_lr_scale"; Muon groups get `adjust_lr_fn` (default "spectral", the mode muP pairs with).

    Args:
        base_width, width: the width hyperparameters were tuned at, and this model's width.
        lr: Muon's lr at the base width. adamw_lr: AdamW groups' lr at the base width (default lr).
        weight_decay: set on every group when given (else the optimizer's default).
        input, output: module-name patterns, as in `apply` (use the same ones).
        muon, adamw, muon_options, adamw_options: passed to `muon.param_groups`.
    """
    ratio = _check_widths(base_width, width)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite float >= 0, got {lr!r}")
    adamw_lr = lr if adamw_lr is None else adamw_lr
    if not (isinstance(adamw_lr, (int, float)) and math.isfinite(adamw_lr) and adamw_lr >= 0):
        raise ValueError(f"adamw_lr must be a finite float >= 0, got {adamw_lr!r}")
    role_of = roles(model, input, output)
    _, outs = io_modules(model, input, output)
    # input/output weights, and output modules' biases, stay on AdamW
    io_params = [name for name, role in role_of.items()
                 if role in ("input", "output") or (role == "vector" and name.rpartition(".")[0] in outs)]
    groups = _base_param_groups(
        model,
        muon=muon,
        adamw=tuple(adamw) + tuple(io_params),
        muon_options=muon_options,
        adamw_options=adamw_options,
    )
    name_of = {id(p): name for name, p in model.named_parameters()}
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    out: list[dict] = []
    for group in groups:
        params = group.pop("params")
        if group["use_muon"]:
            # one group per shape class, since the scale can depend on (m, n)
            by_scale: dict[float, list] = {}
            for p in params:
                _, m, n = matrix_shape(p.shape, group.get("flatten", False), group.get("transposed", False))
                by_scale.setdefault(muon_lr_scale(adjust_lr_fn, m, n, ratio), []).append(p)
            for scale, ps in by_scale.items():
                out.append({**group, "params": ps, "adjust_lr_fn": adjust_lr_fn, "lr": lr * scale,
                            "mup_role": "hidden", "mup_lr_scale": scale, **extra})
        else:
            by_role: dict[str, list] = {}
            for p in params:
                by_role.setdefault(role_of[name_of[id(p)]], []).append(p)
            for role in ROLES:
                if role in by_role:
                    scale = adamw_lr_scale(role, ratio)
                    out.append({**group, "params": by_role[role], "lr": adamw_lr * scale,
                                "mup_role": role, "mup_lr_scale": scale, **extra})
    return out

