"""What does DP-SGD cost per training step? Non-private vs Opacus hooks vs ghost clipping,
and record-level vs patient-level clipping.

    python benchmarks/dp_overhead.py                      # default MLP and CNN, batch 64 and 256
    python benchmarks/dp_overhead.py --shape 1,28,28      # MedMNIST-sized images as well
    python benchmarks/dp_overhead.py --modes none hooks patient   # patient-level vs record-level

``patient``: the same batch as ``hooks`` (record-level), but its records belong to patients
of ``--records-per-patient`` records each, and every patient's per-record gradients are
averaged before clipping (fedpriv's patient-level DP-SGD, hooks mode).

Each configuration runs in a fresh process: ``--steps`` timed steps (forward, backward,
optimizer step on a fixed batch) after ``--warmup`` untimed ones. Peak memory is the growth of
the process's peak RSS over its size after set-up (CPU), or torch's peak allocation (CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.models import build
from fedpriv.privacy.dp import DpPlan, PatientLevelOptimizer, PoissonUnits, make_private
from fedpriv.training import make_loader

MODELS = {
    # name: (model args, input shape) -- the defaults for breast-cancer and digits
    "mlp": ({"in_features": 30, "num_classes": 2}, (30,)),
    "cnn": ({"in_channels": 1, "num_classes": 10}, (1, 8, 8)),
}


def measure(
    model_name: str,
    shape: tuple[int, ...],
    batch: int,
    mode: str,
    steps: int,
    warmup: int,
    device: str,
    records_per_patient: int = 4,
    width: int = 0,
) -> dict[str, Any]:
    torch.manual_seed(0)
    dev = torch.device(device)
    args = dict(MODELS[model_name][0])
    if model_name == "mlp":
        args["in_features"] = int(torch.tensor(shape).prod())
    else:
        args["in_channels"] = shape[0]
    if width > 0:  # the CNN's first-layer channels or the MLP's hidden size
        args["width" if model_name == "cnn" else "hidden"] = width
    model = build(model_name, **args).to(dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, args["num_classes"], (batch,), device=dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion: nn.Module = nn.CrossEntropyLoss()
    if mode != "none":
        plan = DpPlan(
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps_per_round=1,
            rounds=1,
            max_grad_norm=1.0,
            delta=1e-5,
            accountant="rdp",
            target_epsilon=1.0,
        )
        loader: Any = make_loader(x.cpu().numpy(), y.cpu().numpy(), batch_size=batch, shuffle=False)
        if mode == "patient":
            units = np.arange(batch) // records_per_patient
            loader = PoissonUnits(
                x.cpu().numpy(), y.cpu().numpy(), units, sample_rate=0.1, steps=10
            )
        private = make_private(
            model=model,
            optimizer=optimizer,
            loader=loader,
            criterion=criterion,
            plan=plan,
            grad_sample_mode="hooks" if mode == "patient" else mode,
        )
        model, optimizer, criterion = private.model, private.optimizer, private.criterion
        if isinstance(optimizer, PatientLevelOptimizer):  # the batch: every patient, whole
            optimizer.segments = torch.from_numpy(np.arange(batch) // records_per_patient)
            optimizer.units_in_batch = -(-batch // records_per_patient)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {
        "model": model_name,
        "width": width,
        "shape": list(shape),
        "batch": batch,
        "mode": mode,
        "ms_per_step": 1000 * statistics.median(times),
        "peak_mb": round(peak_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        help="extra input shape C,H,W for the CNN (MLP flattens it)",
    )
    parser.add_argument("--modes", nargs="+", default=["none", "hooks", "ghost"])
    parser.add_argument("--records-per-patient", type=int, default=4)
    parser.add_argument(
        "--width", type=int, default=0, help="CNN channels / MLP hidden size (0: the default)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-default-shapes", action="store_true", help="only the --shape inputs")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.one:  # a child process measuring one configuration
        spec = json.loads(args.one)
        print(
            json.dumps(
                measure(
                    spec["model"],
                    tuple(spec["shape"]),
                    spec["batch"],
                    spec["mode"],
                    args.steps,
                    args.warmup,
                    args.device,
                    args.records_per_patient,
                    args.width,
                )
            )
        )
        return
    configs = [] if args.no_default_shapes else [(m, MODELS[m][1]) for m in args.models]
    for text in args.shape:
        shape = tuple(int(v) for v in text.split(","))
        configs += [(m, shape) for m in args.models]
    results = []
    for model_name, shape in configs:
        for batch in args.batches:
            row: dict[str, Any] = {
                "model": model_name,
                "width": args.width,
                "shape": list(shape),
                "batch": batch,
            }
            for mode in args.modes:
                spec = json.dumps(
                    {"model": model_name, "shape": list(shape), "batch": batch, "mode": mode}
                )
                out = (
                    subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--one",
                            spec,
                            "--steps",
                            str(args.steps),
                            "--warmup",
                            str(args.warmup),
                            "--device",
                            args.device,
                            "--records-per-patient",
                            str(args.records_per_patient),
                            "--width",
                            str(args.width),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                measured = json.loads(out)
                row[f"{mode}_ms"] = round(measured["ms_per_step"], 3)
                row[f"{mode}_peak_mb"] = measured["peak_mb"]
            for mode in args.modes:
                if mode != "none" and "none_ms" in row:
                    row[f"{mode}_x"] = round(row[f"{mode}_ms"] / row["none_ms"], 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
