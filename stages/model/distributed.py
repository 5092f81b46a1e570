"""Training in several processes: the torchrun relaunch and its one-line errors, the process-count checks, and
DistributedDataParallel's setup (process group, this process's device) and reductions."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from stages.base.runtime import PipelineError, log
from stages.model.tensors import pick_device


def check_processes(nproc: int) -> None:
    """Before launching: DistributedDataParallel on CUDA runs one process per GPU, and gloo cannot reduce MPS
    tensors, so train.nproc must fit the device that pick_device chooses."""
    device = pick_device()
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise PipelineError(f"train.nproc: {nproc} processes, but this machine has {count} CUDA GPU"
                            f"{'' if count == 1 else 's'} and each process needs its own; set train.nproc to at most "
                            f"{count} (or PIPELINE_DEVICE=cpu to train in CPU processes)")
    if device.type == "mps":
        raise PipelineError(f"train.nproc: {nproc} processes cannot share an MPS device; set train.nproc: 1 "
                            f"(or PIPELINE_DEVICE=cpu to train in CPU processes)")


def relaunch_under_torchrun(nproc: int) -> None:
    """train.nproc > 1: run the train stage under torchrun, one process per worker, and exit with its status.
    The processes' stderr is held back until they end: when one failed with its own one-line `error:`, that line
    is this stage's error (torchrun's report of failed processes would bury it); anything else, a traceback
    included, is shown as it was written."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stages.train"]
    log(f"train.nproc={nproc}: {' '.join(command[1:])}")
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
        status = subprocess.call(command, stderr=stderr)
        stderr.seek(0)
        captured = stderr.read()
    errors = [line for line in captured.splitlines() if line.startswith("error: ")]  # run_stage's lines
    if status != 0 and errors:
        raise PipelineError(errors[0].removeprefix("error: "))
    sys.stderr.write(captured)
    sys.exit(status)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); (0, 1) for a plain single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cpu":  # share the cores instead of every rank spinning on all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return dist.get_rank(), world


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def setup_device(train_cfg: dict[str, Any]) -> tuple[torch.device, int, int]:
    """This process's device, rank and world size, with the CUDA kernel choices train.deterministic asks for."""
    device = pick_device()
    rank, world = init_distributed(device)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not train_cfg["deterministic"]
        if train_cfg["deterministic"]:
            # Deterministic kernels where CUDA has them; the few ops without one (max-pool and bilinear
            # upsampling backward) warn instead of failing, so those runs stay close but not bit-exact.
            torch.use_deterministic_algorithms(True, warn_only=True)
    return device, rank, world


def broadcast_flag(flag: bool, device: torch.device, world: int) -> bool:
    """Rank 0's `flag`, on every process: what only rank 0 can tell (it alone validates)."""
    if world == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def finish_distributed(world: int) -> None:
    """Wait for every process (rank 0 writes the outputs), then leave the process group."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
