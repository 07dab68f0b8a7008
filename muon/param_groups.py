"""`muon.param_groups`: route a model's parameters to Muon (hidden matrices) or AdamW (the rest)."""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase

from torch import nn

from ._shapes import matrix_shape

# Module names (the last component of a qualified name) that mark an output head, as seen in
# GPT-2/nanoGPT (lm_head), timm (head), Llama (output), torchvision/HF (classifier), Essential AI (logits).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "logits"})

_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# Group options only Muon groups read (muon.Muon's constructor arguments for them); an AdamW group reads
# lr, betas, eps, weight_decay and cautious_weight_decay. tests/test_param_groups.py checks the list.
MUON_ONLY_OPTIONS = frozenset({
    "momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn", "flatten", "batched", "backend",
    "ns_dtype", "ns_algorithm", "split", "heads", "variant", "normuon_beta2", "normuon_eps", "transposed",
})
_CONVS = (nn.modules.conv._ConvNd,)
# Modules whose `weight` is stored (in, out), the transpose of nn.Linear's (out, in): (module path
# prefix, class name), matched on the class and its bases so that transformers stays optional.
TRANSPOSED_MODULES = (("transformers.", "Conv1D"),)


def stores_transposed(module: nn.Module) -> bool:
    """Whether `module` keeps its weight as (in, out): transformers' Conv1D (GPT-2, GPT-J's and
    others' c_attn, c_proj, c_fc), or a subclass, recognized by module path and class name."""
    return any(
        cls.__module__.startswith(prefix) and cls.__name__ == name
        for cls in type(module).__mro__
        for prefix, name in TRANSPOSED_MODULES
    )


# Modules whose `weight` is a matrix (or a stack of them) by construction: a 0-/1-D weight there is a
# matrix whose shape a wrapper flattened away (FSDP1's use_orig_params=True shards are 1-D views).
_MATRIX_MODULES = (nn.Linear, nn.Bilinear, *_EMBEDDINGS, *_CONVS)


def _flattened_matrix(p, owners: list[tuple[str, nn.Module]]) -> str | None:
    """Why p is a matrix whose shape cannot be recovered (None: it is not one)."""
    if getattr(p, "_is_flat_param", False) or type(p).__name__ == "FlatParameter":
        return (
            "it is an FSDP1 FlatParameter (FullyShardedDataParallel with use_orig_params=False): one 1-D tensor "
            "holding many parameters, whose matrix shapes are gone"
        )
    if p.ndim < 2:
        for module_name, module in owners:
            if isinstance(module, _MATRIX_MODULES) and getattr(module, "weight", None) is p:
                return (
                    f"it is the weight of {type(module).__name__} {module_name!r} but has shape {tuple(p.shape)}: a "
                    "1-D view of a matrix (FSDP1 with use_orig_params=True shards weights this way)"
                )
    return None


def _route(owners: list[tuple[str, nn.Module]], name: str, ndim: int) -> str:
    """'adamw', 'muon' or 'muon_flat' for one parameter, from every (module name, module) owning it."""
    if ndim < 2:
        return "adamw"
    for module_name, module in owners:
        last = module_name.rsplit(".", 1)[-1].lower()
        if isinstance(module, _EMBEDDINGS) or "embed" in last:
            return "adamw"  # embeddings, and heads tied to them
        if isinstance(module, _NORMS) or "norm" in last:
            return "adamw"
        if last in HEAD_NAMES:
            return "adamw"
    if any(isinstance(module, _CONVS) for _, module in owners):
        return "muon_flat"
    return "muon"


def _hidden_widths(model: nn.Module) -> set[int]:
    """Feature sizes some layer of the model reads: an nn.Linear output of one of these sizes can feed
    the rest of the network (a residual-stream or MLP projection), so it is not taken for an output."""
    widths: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            widths.add(module.in_features)
        elif isinstance(module, _EMBEDDINGS):
            widths.add(module.embedding_dim)
        elif isinstance(module, _CONVS):
            widths.add(module.in_channels)
        elif stores_transposed(module) and getattr(module, "weight", None) is not None:
            widths.add(module.weight.shape[0])
        elif isinstance(module, (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))):
            if module.normalized_shape:
                widths.add(module.normalized_shape[-1])
    return widths


def _unnamed_heads(model: nn.Module) -> list[tuple[nn.Linear, str]]:
    """(nn.Linear, why it looks like an output head) for the heads that no head name marks.

    An output head's outputs are read by no layer of the model (logits, class scores), so a candidate
    is an nn.Linear whose out_features no layer reads (see `_hidden_widths`). Among those, a head is
      * one whose out_features equals the rows of the model's largest embedding (an untied LM head:
        its outputs are the embedding's vocabulary), wherever it is registered;
      * the model's last nn.Linear in registration order (a classifier at the end of an nn.Sequential).
    So an attention output projection or an MLP's down projection (their outputs feed the residual
    stream, which other layers read) is never one, and neither is anything in a model that has none.
    A head tied to an embedding is routed to AdamW by `_route` already.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embeddings = [(name, m) for name, m in model.named_modules() if isinstance(m, _EMBEDDINGS)]
    widths = _hidden_widths(model)
    vocab_name, vocab = max(((n, e.num_embeddings) for n, e in embeddings), key=lambda x: x[1], default=(None, None))
    heads: dict[int, tuple[nn.Linear, str]] = {}
    for module in linears:
        if module.out_features in widths:
            continue
        if module.out_features == vocab:
            heads[id(module)] = (module, f"its {module.out_features} outputs match the {vocab} rows of the "
                                         f"embedding {vocab_name!r}")
        elif module is linears[-1]:
            heads[id(module)] = (module, f"it is the model's last nn.Linear and no layer reads its "
                                         f"{module.out_features} outputs")
    return list(heads.values())


def _warn_unnamed_head(model: nn.Module, routed: dict[int, tuple[str, str, bool]]) -> None:
    """Warn for each output head (see `_unnamed_heads`) that no head name marks and goes to Muon by the
    rules (not by a `muon=` pattern): Muon should not orthogonalize an output head."""
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1].lower() in HEAD_NAMES and any(
            p.ndim >= 2 for p in module.parameters(recurse=False)
        ):
            return  # a head found by name is routed to AdamW already
    for module, why in _unnamed_heads(model):
        if id(module.weight) not in routed:
            continue
        name, route, forced = routed[id(module.weight)]
        if route.startswith("muon") and not forced:
            warnings.warn(
                f"muon.param_groups: {name!r} looks like the output head ({why}) but no head name marks it "
                f"({', '.join(sorted(HEAD_NAMES))}), so it goes to Muon. If it is the output head (a "
                f"classifier or LM head), route it to AdamW with muon.param_groups(model, adamw=[{name!r}]); "
                f"to keep it on Muon and silence this warning, pass muon=[{name!r}].",
                UserWarning,
                stacklevel=3,
            )


def param_groups(
    model: nn.Module,
    *,
    muon: tuple[str, ...] | list[str] = (),
    adamw: tuple[str, ...] | list[str] = (),
    muon_options: dict | None = None,
    adamw_options: dict | None = None,
    split: dict[str, list[int]] | None = None,
    heads: dict[str, int] | None = None,
    transposed: tuple[str, ...] | list[str] = (),
) -> list[dict]:
    """Parameter groups for `muon.Muon`: hidden-layer matrices to Muon, everything else to AdamW.

    AdamW gets embeddings (and output heads tied to them), output heads (modules named lm_head, head,
    output, classifier or logits), norms, biases and every 0-/1-D tensor. Conv weights go to Muon
    with flatten=True ((out, in·kh·kw) matrices); other >2-D weights are batches of matrices.
    A parameter shared by several modules appears once. Heads are routed by name or tying only: when
    no module has a head name and an nn.Linear that looks like an output head goes to Muon — its
    outputs are read by no layer, and it is the model's last nn.Linear (an unnamed classifier at the
    end of an nn.Sequential) or it has as many outputs as the largest embedding has rows (an untied
    LM head) — a UserWarning names it and how to route it. Attention output and MLP projections,
    whose outputs other layers read, never warn.

    Orientation: transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) stores its weight (in, out),
    the transpose of nn.Linear's (out, in). Those weights, and the parameters the `transposed`
    patterns name, go to Muon groups of their own with ``transposed=True`` (see `muon.Muon`), so
    they are updated exactly as the transposed nn.Linear weight would be (update scale, NorMuon's
    output neurons, split/heads rows). `split` and `heads` count their rows as that nn.Linear's:
    out features.

    Args:
        muon, adamw: fnmatch patterns over qualified parameter names (as in model.named_parameters())
            that force a route, overriding the rules above; a name matching both is an error.
        muon_options, adamw_options: extra keys for the groups, e.g. muon_options={"lr": 0.02} and
            adamw_options={"lr": 3e-3, "weight_decay": 0.0}: each group kind its own learning rate
            (a key a group does not set comes from muon.Muon's arguments). The AdamW group holds
            only params, use_muon=False and adamw_options, whose keys must be AdamW's (lr, betas, eps,
            weight_decay, cautious_weight_decay); a Muon-only key there is a ValueError.
        split, heads: {fnmatch pattern: option} over qualified names: Muon parameters matching a
            pattern go to a group of their own carrying `split=` (row counts, e.g. [d, d, d] for a
            fused QKV weight) or `heads=` (equal row blocks), see `muon.Muon`; parameters with the
            same option share a group, so same-shape blocks across layers are batched together.
            Parameters routed to AdamW are left alone; a pattern that matches no Muon parameter, a
            parameter matching two patterns, or sizes that do not fit its rows are a ValueError
            naming it.
        transposed: fnmatch patterns over qualified names of Muon parameters stored (in, out) (or,
            for >2-D, each matrix over the last two dims (..., in, out)), beyond the Conv1D weights
            found by class; a pattern that matches no Muon parameter, or a flattened conv weight
            (more than 2 dims routed with flatten=True), is a ValueError.
    Returns a list of group dicts; empty groups are left out.
    """
    if "transposed" in (muon_options or {}):
        raise ValueError(
            "muon_options cannot set 'transposed': it is a property of each parameter; pass "
            "muon.param_groups(model, transposed=[patterns]) (Conv1D weights are found by class)"
        )
    misplaced = sorted(MUON_ONLY_OPTIONS & set(adamw_options or {}))
    if misplaced:
        raise ValueError(
            f"adamw_options has Muon-only keys {misplaced}: AdamW groups take lr, betas, eps, weight_decay and "
            "cautious_weight_decay (Muon's momentum is AdamW's betas[0])"
        )
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, module))

    routes: dict[str, list] = {"muon": [], "muon_flat": [], "adamw": []}
    routed: dict[int, tuple[str, str, bool]] = {}  # id -> (name, route, forced by a pattern)
    for name, p in model.named_parameters():  # shared parameters come once, under their first name
        forced_muon = any(fnmatchcase(name, pat) for pat in muon)
        forced_adamw = any(fnmatchcase(name, pat) for pat in adamw)
        if forced_muon and forced_adamw:
            raise ValueError(f"parameter {name!r} matches both a `muon` and an `adamw` pattern")
        route = _route(owners.get(id(p), []), name, p.ndim)
        flattened = None if forced_adamw else _flattened_matrix(p, owners.get(id(p), []))
        if flattened is not None:
            # never a silent route to AdamW: the matrices inside would lose Muon without a word
            raise ValueError(
                f"muon.param_groups: parameter {name!r} cannot be routed: {flattened}. Muon needs each matrix "
                "with its shape: wrap the model with FSDP2 (torch.distributed.fsdp.fully_shard), DDP, or call "
                "muon.param_groups(model) on the unwrapped model before wrapping it; to put this parameter on "
                f"AdamW knowingly, pass adamw=[{name!r}]"
            )
        if forced_adamw:
            route = "adamw"
        elif forced_muon:
            if p.ndim < 2:
                raise ValueError(f"parameter {name!r} forced to Muon has shape {tuple(p.shape)}; Muon needs >= 2 dims")
            route = route if route.startswith("muon") else "muon"
        routes[route].append(p)
        routed[id(p)] = (name, route, forced_muon or forced_adamw)
    _warn_unnamed_head(model, routed)
    named = dict(model.named_parameters())
    flipped = _transposed_params(model, routed, named, transposed)
    blocks = _block_options(routed, named, split or {}, heads or {}, flipped)

    groups = []
    for route, flat in (("muon", {}), ("muon_flat", {"flatten": True})):
        for orientation in ({}, {"transposed": True}):  # (out, in) matrices, then (in, out) ones
            mine = [p for p in routes[route] if (id(p) in flipped) == bool(orientation)]
            plain = [p for p in mine if id(p) not in blocks]
            if plain:
                groups.append({"params": plain, "use_muon": True, **flat, **(muon_options or {}), **orientation})
            by_option: dict[tuple, list] = {}
            for p in mine:
                if id(p) in blocks:
                    by_option.setdefault(blocks[id(p)], []).append(p)
            for (key, value), params in by_option.items():
                option = {"split": list(value), "heads": None} if key == "split" else {"split": None, "heads": value}
                groups.append({"params": params, "use_muon": True, **flat, **(muon_options or {}), **option,
                               **orientation})
    if routes["adamw"]:
        groups.append({"params": routes["adamw"], "use_muon": False, **(adamw_options or {})})
    return groups


def _transposed_params(model: nn.Module, routed: dict, named: dict, patterns) -> set[int]:
    """ids of the Muon parameters stored (in, out): Conv1D weights (`stores_transposed`) and those
    the patterns name (a pattern matching no Muon parameter, or a flattened >2-D one, is an error)."""
    flipped = set()
    for module in model.modules():
        weight = getattr(module, "weight", None) if stores_transposed(module) else None
        if isinstance(weight, nn.Parameter) and id(weight) in routed and routed[id(weight)][1] == "muon":
            flipped.add(id(weight))
    for pattern in patterns:
        matched = False
        for pid, (name, route, _) in routed.items():
            if route == "adamw" or not fnmatchcase(name, pattern):
                continue
            if route == "muon_flat" and named[name].ndim > 2:
                raise ValueError(
                    f"transposed pattern {pattern!r} matches {name!r}, a conv weight of shape "
                    f"{tuple(named[name].shape)} routed with flatten=True; transposed reads (in, out) matrices"
                )
            matched = True
            flipped.add(pid)
        if not matched:
            raise ValueError(f"transposed pattern {pattern!r} matches no parameter routed to Muon")
    return flipped


def _block_options(routed: dict, named: dict, split: dict, heads: dict, flipped: set[int]) -> dict[int, tuple]:
    """id(p) -> ("split", sizes) or ("heads", N) for the Muon parameters matching a pattern."""
    chosen: dict[int, tuple] = {}
    for kind, rules in (("split", split), ("heads", heads)):
        for pattern, value in rules.items():
            if kind == "split":
                if not (isinstance(value, (list, tuple)) and value
                        and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in value)):
                    raise ValueError(f"split[{pattern!r}] must be a non-empty list of positive ints, got {value!r}")
                value = tuple(value)
            elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"heads[{pattern!r}] must be a positive int, got {value!r}")
            matched = False
            for pid, (name, route, _) in routed.items():
                if route == "adamw" or not fnmatchcase(name, pattern):
                    continue
                matched = True
                if pid in chosen:
                    other = chosen[pid][2]
                    raise ValueError(f"parameter {name!r} matches two split/heads patterns ({other!r} and {pattern!r})")
                _, m, _ = matrix_shape(named[name].shape, route == "muon_flat", pid in flipped)
                if kind == "split" and sum(value) != m:
                    raise ValueError(
                        f"split[{pattern!r}]={list(value)} sums to {sum(value)}, but {name!r} has {m} rows"
                    )
                if kind == "heads" and m % value:
                    raise ValueError(f"heads[{pattern!r}]={value} does not divide the {m} rows of {name!r}")
                chosen[pid] = (kind, value, pattern)
            if not matched:
                raise ValueError(f"{kind} pattern {pattern!r} matches no parameter routed to Muon")
    return {pid: (kind, value) for pid, (kind, value, _) in chosen.items()}
