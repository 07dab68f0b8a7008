"""`muon.param_groups`: route a model's parameters to Muon (hidden matrices) or AdamW (the rest)."""

from __future__ import annotations

import difflib
import warnings
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch
from torch import nn

from ._shapes import matrix_shape

# Module names (the last component of a qualified name) that mark an output head, as seen in
# GPT-2/nanoGPT (lm_head), timm (head), Llama (output), torchvision/HF (classifier), Essential AI (logits).
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "logits"})
# torchvision's classifier name (ResNet, RegNet, GoogLeNet, Inception): a head only outside repeated blocks
# and when it is the model's last layer or its outputs are read by no layer (a hidden `fc` is not one).
FC_HEAD_NAMES = frozenset({"fc"})

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


def _route(owners: list[tuple[str, nn.Module]], name: str, ndim: int) -> tuple[str, str]:
    """('adamw' | 'muon' | 'muon_flat', why) for one parameter, from every (module name, module) owning it."""
    if ndim < 2:
        return "adamw", f"{ndim}-D (bias, norm gain or scalar)"
    for module_name, module in owners:
        last = module_name.rsplit(".", 1)[-1].lower()
        if isinstance(module, _EMBEDDINGS) or "embed" in last:
            return "adamw", f"embedding ({module_name or type(module).__name__}), or a head tied to it"
        if isinstance(module, _NORMS) or "norm" in last:
            return "adamw", f"norm ({module_name})"
        if last in HEAD_NAMES:
            return "adamw", f"output head (named {last!r})"
    leaf = name.rsplit(".", 1)[-1].lower()
    if any(word in leaf for word in _TABLE_WORDS):
        # ViT's class_token / pos_embedding, Swin's relative_position_bias_table: looked up or added, not
        # matrices that multiply the input
        return "adamw", f"a learned token, position embedding or bias table (named {leaf!r})"
    if any(isinstance(module, _CONVS) for _, module in owners):
        return "muon_flat", "conv weight: one (out, in·kh·kw) matrix (flatten=True), as Keller Jordan's Muon"
    if ndim > 2:
        return "muon", "a batch of matrices over its last two dims (MoE experts (E, out, in))"
    return "muon", "hidden matrix"


# Parameter names (their last component) of >=2-D tensors that are tables, not linear maps: learned
# tokens (class_token, cls_token, register_tokens), position embeddings (pos_embedding, pos_embed),
# bias tables (relative_position_bias_table).
_TABLE_WORDS = ("embed", "token", "bias")


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


def _weighted(module: nn.Module) -> bool:
    """Whether the module itself holds a >= 2-D parameter (a layer, not a container)."""
    return any(p.ndim >= 2 for p in module.parameters(recurse=False))


def _numbered(name: str) -> bool:
    """A qualified name inside a repeated block (a ModuleList / Sequential index), e.g. encoder.layer.0.output."""
    return any(part.isdigit() for part in name.split("."))


def _named_heads(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(module) -> (module name, why) for output heads found by name beyond a head-named layer
    (which `_route` sends to AdamW itself):
      * a head-named container outside any repeated block (torchvision's VGG/AlexNet/MobileNet/
        EfficientNet/ConvNeXt `classifier` Sequential, timm's `head` with a `fc` inside): its last
        layer in registration order is the head, the layers before it are hidden;
      * torchvision's `fc` (ResNet, RegNet, GoogLeNet, Inception) outside any repeated block: a head
        when it is the model's last layer in registration order or no layer reads its outputs (so a
        hidden `fc` feeding a `proj` is not one).
    """
    layers = [(n, m) for n, m in model.named_modules() if _weighted(m)]
    widths = _hidden_widths(model)
    heads: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1].lower()
        if not name or _numbered(name):
            continue
        if last in HEAD_NAMES and not _weighted(module):
            inner = [(n, m) for n, m in module.named_modules(prefix=name) if _weighted(m)]
            if inner:
                heads[id(inner[-1][1])] = (inner[-1][0], f"output head (the last layer of {name!r})")
        elif last in FC_HEAD_NAMES and _weighted(module):
            out = getattr(module, "out_features", getattr(module, "out_channels", None))
            if layers[-1][1] is module or (out is not None and out not in widths):
                heads[id(module)] = (name, f"output head ({name!r}, torchvision's classifier name)")
    return heads


def _input_layer(model: nn.Module, example_input) -> tuple[nn.Module, str, str] | None:
    """(module, name, why) of the layer that reads the model's input, when it is not an embedding
    (embeddings go to AdamW already); None when there is none to move.

    With example_input: the first module holding a >= 2-D parameter that the forward calls (a
    forward pre-hook on each such module; the forward stops there, so no later module runs and no
    state changes). Without: the first conv/linear/embedding in registration order, when it is a
    conv (a ResNet stem conv1, VGG's features.0, ViT's conv_proj / patch projection): an MLP's first
    nn.Linear is left alone, since registration order cannot tell a feature input layer from a
    hidden one (pass example_input, or adamw=[name]).
    """
    names = {id(m): n for n, m in model.named_modules()}
    if example_input is not None:
        found: list[nn.Module] = []

        class _Found(Exception):
            pass

        def hook(module, args, kwargs=None):
            found.append(module)
            raise _Found

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _weighted(m)]
        try:
            with torch.no_grad():
                if isinstance(example_input, dict):
                    model(**example_input)
                elif isinstance(example_input, (tuple, list)):
                    model(*example_input)
                else:
                    model(example_input)
        except _Found:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not found:
            raise ValueError("muon.param_groups: example_input ran the model's forward without calling any layer "
                             "that holds a matrix; the input layer cannot be found")
        module = found[0]
        if isinstance(module, _EMBEDDINGS):
            return None
        return module, names[id(module)], "input layer (the first layer the forward calls on example_input)"
    first = next((m for m in model.modules() if isinstance(m, _MATRIX_MODULES) or stores_transposed(m)), None)
    if first is None or not isinstance(first, _CONVS):
        return None
    return first, names[id(first)], "input layer (the model's first conv: a stem conv or patch projection)"


def _warn_unnamed_head(model: nn.Module, routed: dict[int, tuple[str, str, bool]], named_heads: dict) -> None:
    """Warn for each output head (see `_unnamed_heads`) that no head name marks and goes to Muon by the
    rules (not by a `muon=` pattern): Muon should not orthogonalize an output head."""
    if named_heads:
        return
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1].lower() in HEAD_NAMES and _weighted(module):
            return  # a head found by name is routed to AdamW already
    for module, why in _unnamed_heads(model):
        if id(module.weight) not in routed:
            continue
        name, route, forced = routed[id(module.weight)]
        if route.startswith("muon") and not forced:
            warnings.warn(
                f"muon.param_groups: {name!r} looks like the output head ({why}) but no head name marks it "
                f"({', '.join(sorted(HEAD_NAMES | FC_HEAD_NAMES))}), so it goes to Muon. If it is the output head "
                f"(a classifier or LM head), route it to AdamW with muon.param_groups(model, adamw=[{name!r}]); "
                f"to keep it on Muon and silence this warning, pass muon=[{name!r}].",
                UserWarning,
                stacklevel=4,
            )


class Route(NamedTuple):
    """One parameter's routing, as `muon.param_routing` reports it."""

    name: str  # its qualified name (the first, for a shared parameter)
    shape: tuple[int, ...]
    group: str  # "adamw", "muon", "muon flatten", "muon transposed", with " split=[...]" / " heads=N"
    reason: str


def param_routing(model: nn.Module, **options) -> list[Route]:
    """The routing `muon.param_groups(model, **options)` makes, one `Route` (name, shape, group,
    reason) per parameter in model.named_parameters() order; print it with `format_routing`."""
    return _plan(model, **options)[1]


def format_routing(routes: list[Route]) -> str:
    """A fixed-width table of `param_routing`'s rows: parameter, shape, group, reason."""
    rows = [("parameter", "shape", "group", "reason")]
    rows += [(r.name, "×".join(map(str, r.shape)) or "()", r.group, r.reason) for r in routes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows
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
    example_input=None,
    split_gate_up: bool = True,
    verbose: bool = False,
) -> list[dict]:
    """Parameter groups for `muon.Muon`: hidden-layer matrices to Muon, everything else to AdamW.

    AdamW gets embeddings (and output heads tied to them), the input layer (see below), output heads,
    norms, biases, every 0-/1-D tensor and >= 2-D tables (parameters named *embed*, *token* or
    *bias*: ViT's class_token and pos_embedding, Swin's relative_position_bias_table). Output heads:
    modules named lm_head, head, output, classifier or logits; the last layer of a container so
    named outside a repeated block (torchvision's VGG `classifier` Sequential: classifier.6, not
    classifier.0); torchvision's `fc` (ResNet) when it is the model's last layer or no layer reads
    its outputs. Conv weights go to Muon with flatten=True ((out, in·kh·kw) matrices, as Keller
    Jordan's Muon); other >2-D weights are batches of matrices (MoE expert stacks (E, out, in)).
    A parameter shared by several modules appears once. When no head is found by name and an
    nn.Linear that looks like an output head goes to Muon — its outputs are read by no layer, and
    it is the model's last nn.Linear or it has as many outputs as the largest embedding has rows —
    a UserWarning names it and how to route it.

    Input layer (Keller Jordan: "the input and output layers ... should be optimized by AdamW"; for
    a ConvNet, Muon for "all the convolutional filters except the first one"): the layer that reads
    the model's input goes to AdamW. With ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments for model's forward) it is the first layer holding a
    matrix that the forward calls (the forward stops there); without it, the first conv/linear/
    embedding in registration order when that is a conv (a stem conv, a patch projection). An
    embedding is AdamW anyway; an MLP's first nn.Linear stays on Muon without example_input.

    MoE: expert stacks (E, out, in) are batches of E matrices; routers (E, d) are hidden matrices
    and stay on Muon (as Moonlight, trained with Muon, routes every matrix but embedding and head).
    A fused gate/up weight (a parameter or module named gate_up_proj whose sibling down_proj has the
    matching shape: transformers' Mixtral, Qwen-MoE, Phi-3) gets split=[I, I], so gate and up are
    orthogonalized separately, as the unfused model's gate_proj and up_proj (split_gate_up=False
    keeps them one matrix; NorMuon groups keep them whole, as NorMuon does not take split yet).

    Orientation: transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc) stores its weight (in, out),
    the transpose of nn.Linear's (out, in). Those weights, and the parameters the `transposed`
    patterns name, go to Muon groups of their own with ``transposed=True`` (see `muon.Muon`), so
    they are updated exactly as the transposed nn.Linear weight would be (update scale, NorMuon's
    output neurons, split/heads rows). `split` and `heads` count their rows as that nn.Linear's:
    out features.

    Args:
        muon, adamw: fnmatch patterns over qualified parameter names (every name of a shared
            parameter) that force a route, overriding the rules above; a name matching both, or a
            pattern matching no parameter, is a ValueError.
        muon_options, adamw_options: extra keys for the groups, e.g. muon_options={"lr": 0.02} and
            adamw_options={"lr": 3e-3, "weight_decay": 0.0}: each group kind its own learning rate
            (a key a group does not set comes from muon.Muon's arguments). The AdamW group holds
            only params, use_muon=False and adamw_options, whose keys must be AdamW's (lr, betas, eps,
            weight_decay, cautious_weight_decay); a Muon-only key there is a ValueError. Conv groups
            keep flatten=True whatever muon_options says.
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
        example_input: see "Input layer" above.
        split_gate_up: split fused gate/up weights (see "MoE" above).
        verbose: print the routing table (`format_routing(param_routing(model, ...))`).
    Returns a list of group dicts; empty groups are left out. A parameter with 4 or more dims that
    is no conv weight stops with a ValueError naming it: say flatten= in muon_options.
    """
    groups, routes = _plan(model, muon=muon, adamw=adamw, muon_options=muon_options, adamw_options=adamw_options,
                           split=split, heads=heads, transposed=transposed, example_input=example_input,
                           split_gate_up=split_gate_up)
    if verbose:
        print(format_routing(routes))
    return groups


def _plan(
    model: nn.Module,
    *,
    muon=(),
    adamw=(),
    muon_options: dict | None = None,
    adamw_options: dict | None = None,
    split: dict | None = None,
    heads: dict | None = None,
    transposed=(),
    example_input=None,
    split_gate_up: bool = True,
) -> tuple[list[dict], list[Route]]:
    """(groups, one Route per parameter): `param_groups` and `param_routing`."""
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
    for kind, patterns in (("muon", muon), ("adamw", adamw)):
        if isinstance(patterns, str):
            raise ValueError(f"{kind}= takes a list of patterns, got the string {patterns!r}: pass [{patterns!r}]")
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, module))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    all_names = [n for names in aliases.values() for n in names]
    for kind, patterns in (("muon", muon), ("adamw", adamw)):
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in all_names):
                close = difflib.get_close_matches(pattern, all_names, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else "; see muon.param_routing(model) for the names"
                raise ValueError(f"muon.param_groups: {kind} pattern {pattern!r} matches no parameter{hint}")
    named_heads = _named_heads(model)
    entry = _input_layer(model, example_input)
    special: dict[int, str] = {}  # id(p) -> why it goes to AdamW beyond `_route`
    modules = {id(m): m for m in model.modules()}
    for module_id, (_, why) in named_heads.items():
        for p in modules[module_id].parameters(recurse=False):
            if p.ndim >= 2:
                special.setdefault(id(p), why)
    if entry is not None:
        for p in entry[0].parameters(recurse=False):
            if p.ndim >= 2:
                special.setdefault(id(p), f"{entry[2]}: {entry[1]!r}")

    routers = _routers(model)
    routes: dict[str, list] = {"muon": [], "muon_flat": [], "adamw": []}
    routed: dict[int, tuple[str, str, bool]] = {}  # id -> (name, route, forced by a pattern)
    reasons: dict[int, str] = {}
    for name, p in model.named_parameters():  # shared parameters come once, under their first name
        names = aliases.get(id(p), [name])
        forced_muon = any(fnmatchcase(n, pat) for n in names for pat in muon)
        forced_adamw = any(fnmatchcase(n, pat) for n in names for pat in adamw)
        if forced_muon and forced_adamw:
            raise ValueError(f"parameter {name!r} matches both a `muon` and an `adamw` pattern")
        route, why = _route(owners.get(id(p), []), name, p.ndim)
        if route != "adamw" and id(p) in special:
            route, why = "adamw", special[id(p)]
        elif route == "muon" and id(p) in routers:
            why = ("MoE router: a hidden matrix, on Muon as in Moonlight (Muon for every matrix but the embedding "
                   "and the head)")
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
            route, why = "adamw", "adamw= pattern"
        elif forced_muon:
            if p.ndim < 2:
                raise ValueError(f"parameter {name!r} forced to Muon has shape {tuple(p.shape)}; Muon needs >= 2 dims")
            if not route.startswith("muon"):
                is_conv = any(isinstance(m, _CONVS) for _, m in owners.get(id(p), []))
                route = "muon_flat" if is_conv and p.ndim > 2 else "muon"
            why = f"muon= pattern (was: {why})"
        if route == "muon" and p.ndim >= 4 and (muon_options or {}).get("flatten") is None:
            raise ValueError(
                f"muon.param_groups: {name!r} has shape {tuple(p.shape)} and is no conv weight: say how Muon sees "
                "it, muon_options={'flatten': False} for a batch of matrices over its last two dims, or "
                "{'flatten': True} for one (shape[0], prod(rest)) matrix (conv weights found by class keep "
                f"flatten=True), or adamw=[{name!r}]"
            )
        routes[route].append(p)
        routed[id(p)] = (name, route, forced_muon or forced_adamw)
        reasons[id(p)] = why
    _warn_unnamed_head(model, routed, named_heads)
    named = dict(model.named_parameters())
    flipped = _transposed_params(model, routed, named, transposed)
    blocks = _block_options(routed, named, split or {}, heads or {}, flipped)
    if split_gate_up and (muon_options or {}).get("variant", "muon") != "normuon":
        for pid, option in _gate_up_splits(routed, named, flipped).items():
            if pid not in blocks:
                blocks[pid] = option
                reasons[pid] = (f"fused gate and up projections (gate_up_proj): split={list(option[1])}, each "
                                "orthogonalized as the unfused gate_proj and up_proj")

    groups = []
    for route, flat in (("muon", {}), ("muon_flat", {"flatten": True})):
        for orientation in ({}, {"transposed": True}):  # (out, in) matrices, then (in, out) ones
            mine = [p for p in routes[route] if (id(p) in flipped) == bool(orientation)]
            plain = [p for p in mine if id(p) not in blocks]
            if plain:
                groups.append({"params": plain, "use_muon": True, **(muon_options or {}), **flat, **orientation})
            by_option: dict[tuple, list] = {}
            for p in mine:
                if id(p) in blocks:
                    by_option.setdefault(blocks[id(p)], []).append(p)
            for (key, value), params in by_option.items():
                option = {"split": list(value), "heads": None} if key == "split" else {"split": None, "heads": value}
                groups.append({"params": params, "use_muon": True, **(muon_options or {}), **flat, **option,
                               **orientation})
    if routes["adamw"]:
        groups.append({"params": routes["adamw"], "use_muon": False, **(adamw_options or {})})

    table = []
    for name, p in model.named_parameters():
        _, route, _ = routed[id(p)]
        group = "adamw" if route == "adamw" else "muon flatten" if route == "muon_flat" else "muon"
        if id(p) in flipped:
            group += " transposed"
        if id(p) in blocks:
            key, value = blocks[id(p)]
            group += f" split={list(value)}" if key == "split" else f" heads={value}"
        table.append(Route(name, tuple(p.shape), group, reasons[id(p)]))
    return groups, table


def _routers(model: nn.Module) -> set[int]:
    """ids of MoE router weights: modules whose class name has "Router" (transformers' MixtralTopKRouter,
    Qwen3MoeTopKRouter, ...), or named router, or named gate beside an `experts` module."""
    found = set()
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        last = name.rsplit(".", 1)[-1]
        if "router" in type(module).__name__.lower() or last == "router" or (
            last == "gate" and hasattr(parent, "experts")
        ):
            found.update(id(p) for p in module.parameters(recurse=False) if p.ndim >= 2)
    return found


def _gate_up_splits(routed: dict, named: dict, flipped: set[int]) -> dict[int, tuple]:
    """id(p) -> ("split", (I, I)) for fused gate/up weights routed to Muon: a parameter named
    gate_up_proj (a stack (..., 2I, H)) or the weight of a module named gate_up_proj ((2I, H)),
    whose sibling down_proj is (..., H, I): transformers' Mixtral, Qwen-MoE and Phi-3 layouts, where
    the forward cuts the output features in two halves (chunk(2)). gpt-oss's interleaved (…, H, 2I)
    stack does not match and is left whole."""
    found = {}
    for pid, (name, route, _) in routed.items():
        parts = name.split(".")
        if route != "muon" or pid in flipped or "gate_up_proj" not in parts[-2:]:
            continue
        i = len(parts) - 1 - parts[::-1].index("gate_up_proj")
        down = named.get(".".join(parts[:i] + ["down_proj"] + parts[i + 1 :]))
        p = named[name]
        if down is None or down.ndim != p.ndim or p.ndim < 2:
            continue
        rows, cols = p.shape[-2], p.shape[-1]
        if rows % 2 == 0 and down.shape[-2] == cols and down.shape[-1] == rows // 2:
            found[pid] = ("split", (rows // 2, rows // 2))
    return found


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
