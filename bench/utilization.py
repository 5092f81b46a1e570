"""How close a training step comes to what this CPU can do, in one run: the host (CPU model, flags, cores, torch and
oneDNN versions), the best GEMM rate in fp32 and bf16 (P, the better of the two), each preset's step rate at the
precision train.precision: auto picks here, its conv/linear FLOP/s and utilization U = step FLOP/s / P, the
estimated time of the preset's whole training run and NTTA = that time x P (a time normalized by the host's
measured speed, comparable across hosts), and the per-op breakdown of the default step.

    python bench/utilization.py                 # the default recipe and airnet-fast
    python bench/utilization.py --steps 2       # quicker, noisier

FLOPs are counted by torch.utils.flop_counter (forward and backward of the convolutions and matmuls), not
estimated. The run time is estimated from the step rate (full-size steps; the low-resolution epochs are cheaper,
so the estimate errs long); a measured run's seconds can be given with --run-seconds NAME=S."""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch
import torch.nn.functional as F
import yaml
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from workspace import REPO_ROOT, header

sys.path.insert(0, str(REPO_ROOT))
import stages  # noqa: E402,F401  (the stages' thread and allocator settings)
from stages.base.config import set_dotted  # noqa: E402
from stages.base.specs import model_config_of  # noqa: E402
from stages.model.nets import build_model  # noqa: E402
from stages.model.optim import make_optimizers  # noqa: E402
from stages.model.precision import CpuInfo, autocast_dtype, precision_name  # noqa: E402

CIFAR_TRAIN = 50_000  # CIFAR-10's training images, before the preset's data.val_fraction is held out
GEMM_SIZE = 4096


def gemm_rate(dtype: torch.dtype, repeats: int = 10) -> float:
    """The best FLOP/s of a square matmul in `dtype` (two of them first, to warm up)."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    best = 0.0
    for attempt in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        rate = 2 * GEMM_SIZE**3 / (time.perf_counter() - start)
        if attempt >= 2:
            best = max(best, rate)
    return best


def preset_params(name: str) -> dict:
    """params.yaml with presets/<name>.yaml applied (airnet: the defaults themselves)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if name != "airnet":
        for dotted, value in _flat("", yaml.safe_load((REPO_ROOT / "presets" / f"{name}.yaml").read_text())):
            set_dotted(params, dotted, value)
    return params


def _flat(prefix: str, value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in _flat(f"{prefix}{key}.", inner)]
    return [(prefix.removesuffix("."), value)]


def step_function(train: dict, batch: int):
    """One training step of `train`'s model (channels_last, auto precision, its optimizers) on random images."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    model = build_model(train["model"], model_config_of(train), 10, 32, [0.5] * 3, [0.25] * 3)
    if hasattr(model.net, "init_from_data"):
        model.net.init_from_data(torch.randn(2000, 3, 32, 32, generator=generator))
    channels_last = train["channels_last"] and train["model"] != "mlp"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(model, train, device)
    dtype = autocast_dtype(train["precision"], device)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=generator)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=train["label_smoothing"])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step, precision_name(dtype)


def measure(name: str, steps: int, peak: float, run_seconds: float | None) -> tuple[dict, object]:
    params = preset_params(name)
    train, batch = params["train"], params["train"]["batch_size"]
    train_images = round(CIFAR_TRAIN * (1 - params["data"]["val_fraction"]))
    step, precision = step_function(train, batch)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    estimated = train["epochs"] * train_images / (batch / seconds)
    wall = run_seconds or estimated
    row = {"preset": name, "precision": precision, "batch": batch, "images/s": batch / seconds,
           "GFLOP/image": flops / batch / 1e9, "step TFLOP/s": flops / seconds / 1e12, "U": flops / seconds / peak,
           "train s": wall, "measured": run_seconds is not None, "NTTA (PFLOP)": wall * peak / 1e15}
    return row, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--run-seconds", action="append", default=[], metavar="NAME=S",
                        help="a measured training time of a preset (train_time.json's seconds) to use for NTTA")
    args = parser.parse_args()
    header("utilization: step FLOP/s against the host's best GEMM")
    cpu = CpuInfo.read()
    onednn = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
    print(f"cpu: {cpu.describe()}, native bf16: {cpu.native_bf16()}; torch {torch.__version__}, oneDNN "
          f"{onednn.group(1) if onednn else 'unknown'}, {torch.get_num_threads()} threads")
    fp32, bf16 = gemm_rate(torch.float32), gemm_rate(torch.bfloat16)
    peak = max(fp32, bf16)
    print(f"GEMM {GEMM_SIZE}x{GEMM_SIZE}: fp32 {fp32 / 1e9:,.0f} GFLOP/s, bf16 {bf16 / 1e9:,.0f} GFLOP/s; "
          f"P = {peak / 1e9:,.0f} GFLOP/s")
    measured = dict(item.split("=", 1) for item in args.run_seconds)
    rows, default_step = [], None
    for name in ("airnet", "airnet-fast"):
        row, step = measure(name, args.steps, peak, float(measured[name]) if name in measured else None)
        rows.append(row)
        default_step = default_step or step
    print("\n| preset | precision | batch | images/s | GFLOP/image | step TFLOP/s | U | training s | NTTA (PFLOP) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        when = f"{r['train s']:,.0f}" + ("" if r["measured"] else " (est.)")
        print(f"| {r['preset']} | {r['precision']} | {r['batch']} | {r['images/s']:,.0f} | {r['GFLOP/image']:.3f} | "
              f"{r['step TFLOP/s']:.3f} | {r['U']:.2f} | {when} | {r['NTTA (PFLOP)']:.2f} |")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        default_step()
    print("\nthe default step by op (self CPU time):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
