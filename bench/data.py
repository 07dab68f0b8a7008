"""Byte-level text for the experiments: the Python standard library's own sources, or a user's file.

The default needs no download: the .py files of the running interpreter's standard library (real
text, and Python code as in the paper's training mix), read in sorted order and split into train and
validation by a hash of each file's relative path (about 1 file in 10 to validation), so the split is
the same on every run and every machine with the same Python. A user file is split by position: the
last `val_fraction` of its bytes is validation. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256
DEFAULT_MAX_BYTES = 16 * 2**20
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}


@dataclass
class ByteData:
    train: torch.Tensor  # uint8, 1-D
    val: torch.Tensor  # uint8, 1-D
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel())}


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # prune: site-packages alone can be GBs
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"no Python standard library sources found under {root}; pass --data FILE")
    return root, files


def _is_val(relative: str, val_fraction: float) -> bool:
    # crc32 is stable across runs and platforms (str hash() is salted per process)
    return (zlib.crc32(relative.encode()) % 1000) < val_fraction * 1000


def load(path: str | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.1) -> ByteData:
    """Train/validation byte tensors from `path` (any file) or, with path=None, the stdlib sources.

    max_bytes caps the total read: (1 - val_fraction)·max_bytes of train and val_fraction·max_bytes of
    validation, taking stdlib files in sorted path order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    if path is not None:
        raw = Path(path).read_bytes()[:max_bytes]
        if len(raw) < 64:
            raise ValueError(f"data file {path!r} has {len(raw)} bytes; need at least 64")
        cut = int(len(raw) * (1 - val_fraction))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return ByteData(t[:cut].clone(), t[cut:].clone(), f"file:{path}")
    root, files = _stdlib_files()
    # Each split has its own share of the cap, so a small cap still gives a ~val_fraction split.
    budget = {"train": max_bytes - int(max_bytes * val_fraction), "val": int(max_bytes * val_fraction)}
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for f in files:
        split = "val" if _is_val(f.relative_to(root).as_posix(), val_fraction) else "train"
        if budget[split] <= 0:
            if budget["train"] <= 0 and budget["val"] <= 0:
                break
            continue
        raw = f.read_bytes()[: budget[split]]
        budget[split] -= len(raw)
        parts[split].append(raw)
    train, val = parts["train"], parts["val"]
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).clone()
    return ByteData(as_tensor(train), as_tensor(val), f"python-stdlib:{root}")


def sample_batch(
    tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of seq_len + 1 bytes: (inputs, next-byte targets), int64."""
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"need more than seq_len + 1 = {seq_len + 1} tokens, have {tokens.numel()}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=generator)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def val_batches(tokens: torch.Tensor, batch: int, seq_len: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed validation batches: windows evenly spaced over the validation bytes."""
    n = batch * count
    span = tokens.numel() - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation set of {tokens.numel()} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.linspace(0, span, n).long().tolist()
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts]).long()
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


def add_run_arguments(p, out_default: str) -> None:
    """Arguments every training experiment shares: data, seed, threads and output."""
    p.add_argument("--data", help="a text file to train on (default: the Python stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=16 * 2**20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    p.add_argument("--out", default=out_default, help="folder for the JSON and plots")
    p.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    p.add_argument("--no-plot", action="store_true")


def settings(args, quick: dict, full: dict, positive: tuple[str, ...]) -> dict:
    """The quick or full settings with every command-line value given laid over them; the keys in
    `positive` must be >= 1."""
    s = dict(quick if args.quick else full)
    for key in s:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    for key in positive:
        if s[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    return s


def write_result(args, result: dict, name: str, plot) -> None:
    """Write NAME.json (and NAME.png through `plot(result, path)` unless --no-plot) under --out;
    with --json also print the result to stdout."""
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, out / f"{name}.png")
    if args.json:
        print(json.dumps(result))
