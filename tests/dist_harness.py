"""The multi-process harness the distributed tests share (CPU, gloo): spawn a job of `world` ranks,
run named scenarios on every rank, and read each rank's verdicts back.

A job's target is `target(rank, world, port, outdir, *args)`; each rank writes what it found to
`outdir/rank<r>.json`, which the test reads (`read_ranks`). The scenario modules
(tests/dist_scenarios.py, two ranks; tests/mesh_scenarios.py, four ranks on 2×2 meshes) define their
scenarios and a `run_scenarios` target on top of `run_scenarios` here; the test modules
(test_distributed.py, test_mesh.py) run them once per module (`run_job`) and check one scenario per
test (`assert_scenario_ok`), marked with `marks()`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def marks() -> list:
    """The marks of a multi-process test module (its `pytestmark`): skipped without gloo, and one
    pytest-xdist worker runs every multi-process test, one at a time (and each module's shared job
    once). pytest is imported here only: the spawned ranks import this module too."""
    import pytest

    return [
        pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                           reason="needs torch.distributed with gloo"),
        pytest.mark.xdist_group("processes"),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target, *args) -> None:
    """A rank's process: the job, then an exit without interpreter finalization (its verdict is on
    disk by then). A gloo worker thread can drop the last reference to a finished collective's tensors
    after the main thread has entered Py_FinalizeEx, and then takes the GIL from a finalizing
    interpreter and aborts the process ("terminate called without an active exception",
    pytorch/pytorch#190489). muon's own collectives wait for the backend to let go of their tensors
    (muon.distributed.collectives), but a job also runs torch's (distribute_tensor, full_tensor),
    which do not: ending the rank with os._exit after flushing its output keeps that race out of the
    verdict. An exception the job did not catch is exit code 1."""
    import sys

    code = 0
    try:
        target(*args)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(target, world: int, outdir: str, args: tuple = (), deadline_s: float = 120.0,
           finalize: bool = False) -> list[int]:
    """Run target(rank, world, port, outdir, *args) in `world` spawned processes; exit codes.
    finalize=True: each rank ends as a user's process does, through interpreter finalization (the
    tests that check a rank whose step raised still exits cleanly); else `_rank_main`."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, outdir, *args)) if finalize else
             ctx.Process(target=_rank_main, args=(target, r, world, port, outdir, *args))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():  # the test failed by hanging: never leave the process behind
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def init_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    """This rank's gloo process group on the job's port, one thread per rank (ranks share the cores)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def write_rank(outdir: str, rank: int, result, prefix: str = "") -> None:
    with open(os.path.join(outdir, f"{prefix}rank{rank}.json"), "w") as f:
        json.dump(result, f)


def read_ranks(outdir, world: int, prefix: str = "") -> list:
    """What each rank wrote (`write_rank`); {} for a rank that wrote nothing."""
    paths = [os.path.join(outdir, f"{prefix}rank{r}.json") for r in range(world)]
    return [json.load(open(path)) if os.path.exists(path) else {} for path in paths]


def run_scenarios(scenarios: dict, rank: int, world: int, port: int, outdir: str, names: list[str], *,
                  timeout_s: float, setup=None, extra=None) -> None:  # fmt: skip
    """On this rank: the process group, `setup()`, then every named scenario in turn; after each, the
    verdicts so far ("ok" or the traceback) and `extra()`'s entries are written to rank<r>.json (a rank
    that dies leaves what it had)."""
    init_gloo(rank, world, port, timeout_s)
    if setup is not None:
        setup()
    results = {}
    for name in names:
        try:
            scenarios[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        if extra is not None:
            results.update(extra())
        write_rank(outdir, rank, results)
    dist.destroy_process_group()


def run_job(module, world: int, outdir: str, deadline_s: float) -> tuple[list, list]:
    """Every scenario of a scenario module (its SCENARIOS and run_scenarios) in one job: the exit
    codes and each rank's verdicts."""
    codes = launch(module.run_scenarios, world, outdir, args=(list(module.SCENARIOS),), deadline_s=deadline_s)
    return codes, read_ranks(outdir, world)


def assert_scenario_ok(codes: list, results: list, name: str) -> None:
    for r, result in enumerate(results):
        assert name in result, f"rank {r} never finished {name!r} (exit codes {codes})"
        assert result[name] == "ok", f"rank {r}, {name}:\n{result[name]}"
