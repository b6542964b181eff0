"""The device time of reproducing the CIFAR-100 tables (the 13 CRD pairs), from measured step costs.

For each pair (``conf/experiment/cifar100_*`` with ``cifar_row`` columns) it times kd's training
step of the pair's ``kd`` column on the device, and for each column its step on one pair (the
first that sweeps it) against that pair's ``kd`` step; a cell's step cost is then the pair's
``kd`` step times the column's ratio. A cell's time is its epochs (240, plus the 30 epochs of the
initialisation stage of AB, FT and FSP) x steps per epoch (45,000 training images under kd's
default protocol, 50,000 under ``protocol=paper``, batch 64) x its step cost, plus every epoch's
evaluation of the student (the 5,000 held-out images under kd's protocol, the 10,000 test images
under ``protocol=paper``) and the final test, in batches of 512, timed as the pair's student
forward. Teachers are trained once per teacher architecture (not counted: a released
checkpoint, ``teacher.ckpt=``, skips them). Random weights, generated data of the real shapes (the
step cost does not depend on the values), kd's default path (no teacher cache, fp32 unless
``--precision``). Not a test: the numbers depend on the machine and its load.

Usage:
    .venv/bin/python scripts/table_cost.py --device cuda                 # every pair and column
    .venv/bin/python scripts/table_cost.py --pairs resnet32x4_resnet8x4 --steps 3 --warmup 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark import compose, kd_loop, sync  # noqa: E402  (scripts/benchmark.py)

EPOCHS, STAGE_EPOCHS, BATCH = 240, 30, 64
TRAIN = {"honest": 45_000, "paper": 50_000}
TEST, EVAL_BATCH = 10_000, 512
EVALUATED = {"honest": 5_000, "paper": TEST}  # per epoch: the validation split, or the test set under paper
STAGED = {"ab", "ft", "fsp"}  # their initialisation stage: 30 more epochs (RepDistiller's --init_epochs)
TABLE_1 = ["wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20", "resnet110_resnet32",
           "resnet32x4_resnet8x4", "vgg13_vgg8"]
TABLE_2 = ["vgg13_mobilenetv2", "resnet50_mobilenetv2", "resnet50_vgg8", "resnet32x4_shufflenetv1",
           "resnet32x4_shufflenetv2", "wrn_40_2_shufflenetv1"]


def columns(pair: str) -> list[str]:
    """The columns the pair's experiment sweeps."""
    node = OmegaConf.load(ROOT / "conf" / "experiment" / f"cifar100_{pair}.yaml")
    return str(node.hydra.sweeper.params.cifar_row).split(",")


def step_seconds(pair: str, column: str, data_root: Path, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per training step of one cell on the device (random weights)."""
    from kd.models.build import build_model

    cfg = compose([f"experiment=cifar100_{pair}", f"cifar_row={column}", f"data.root={data_root}", "data.val_size=32",
                   f"trainer.precision={args.precision}"])
    torch.manual_seed(0)
    fits = {"num_classes": 100, "input_shape": (3, 32, 32)}
    teacher = build_model(cfg.model.teacher, key="model.teacher", **fits)
    student = build_model(cfg.model.student, key="model.student", **fits)
    seconds, _ = kd_loop(cfg, teacher.state_dict(), student.state_dict(), args.warmup, args.steps, device, None)
    return seconds


def eval_seconds(pair: str, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per evaluation batch (512 images) of the pair's student: its forward, no gradient."""
    import time

    from kd.models.build import build_model

    cfg = compose([f"experiment=cifar100_{pair}"])
    torch.manual_seed(0)
    student = build_model(cfg.model.student, key="model.student", num_classes=100, input_shape=(3, 32, 32))
    student = student.to(device).eval()
    x = torch.randn(EVAL_BATCH, 3, 32, 32, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    with torch.inference_mode(), autocast:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync(device)
                start = time.perf_counter()
            student(x)
        sync(device)
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> None:
    import logging
    import warnings

    from tests.datagen import write_cifar

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", nargs="*", default=TABLE_1 + TABLE_2, help="experiment names without cifar100_")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--precision", default="32-true", help="32-true (the papers') or bf16-mixed")
    parser.add_argument("--seeds", type=int, default=1, help="runs per cell")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{device} ({capability}), {args.precision}, {args.warmup} warm-up + {args.steps} timed steps", flush=True)

    kd_step: dict[str, float] = {}
    eval_step: dict[str, float] = {}
    ratio: dict[str, float] = {"kd": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "cifar"
        write_cifar(data_root, n_train=BATCH * (args.warmup + args.steps) + 32, n_test=100, labels_used=32)
        for pair in args.pairs:
            kd_step[pair] = step_seconds(pair, "kd", data_root, args, device)
            eval_step[pair] = eval_seconds(pair, args, device)
            print(f"  {pair} kd: {kd_step[pair] * 1e3:.1f} ms/step, evaluation {eval_step[pair] * 1e3:.1f} ms per "
                  f"{EVAL_BATCH} images", flush=True)
        for column in sorted({c for p in args.pairs for c in columns(p)} - {"kd"}):
            pair = next(p for p in args.pairs if column in columns(p))
            ratio[column] = step_seconds(pair, column, data_root, args, device) / kd_step[pair]
            print(f"  {column} on {pair}: {ratio[column]:.2f} x kd", flush=True)

    print("\n| table | pairs | cells | runs | device-hours, kd's protocol | device-hours, protocol=paper |")
    print("|---|---:|---:|---:|---:|---:|")
    totals: dict[str, float] = {"honest": 0.0, "paper": 0.0}
    for title, pairs in (("CRD Table 1 (same architecture)", TABLE_1), ("CRD Table 2 (across architectures)", TABLE_2)):
        pairs = [p for p in pairs if p in kd_step]
        if not pairs:
            continue
        cells = [(p, c) for p in pairs for c in columns(p)]
        hours = {}
        for protocol, n_train in TRAIN.items():
            steps = math.ceil(n_train / BATCH)
            evals = EPOCHS * math.ceil(EVALUATED[protocol] / EVAL_BATCH) + math.ceil(TEST / EVAL_BATCH)  # + the test
            seconds = sum((EPOCHS + (STAGE_EPOCHS if c in STAGED else 0)) * steps * kd_step[p] * ratio[c]
                          + evals * eval_step[p] for p, c in cells)
            hours[protocol] = args.seeds * seconds / 3600
            totals[protocol] += hours[protocol]
        print(f"| {title} | {len(pairs)} | {len(cells)} | {len(cells) * args.seeds} | {hours['honest']:,.0f} | "
              f"{hours['paper']:,.0f} |")
    print(f"| all | | | | {totals['honest']:,.0f} | {totals['paper']:,.0f} |")


if __name__ == "__main__":
    main()
