"""Prints kd's compression report for a digits run and a CIFAR zoo pair, one row per variant.

Each variant is one real ``kd-train`` run (``kd.training.run.run`` on the composed config, KD throughout)
with its compression callbacks; the table is read from the runs' ``results.json`` reports. The
CIFAR pair trains 5 short epochs (10 batches each) on generated CIFAR-100 pickles of the real
format (random pixels, so its accuracies mean nothing; sizes and latencies do). Not a test: numbers depend on the machine.

Usage:
    .venv/bin/python scripts/compression_benchmark.py                 # both workloads
    .venv/bin/python scripts/compression_benchmark.py --workload digits --epochs 30
    .venv/bin/python scripts/compression_benchmark.py --lower     # + latency after x86 lowering

``--lower`` also compiles the dense and the int8 programs with ``kd.compress.pt2e.lower_for_x86``
(inductor with freezing: x86 int8 kernels for int8 programs, fused fp32 kernels for the dense
one) and times them the same way, which is where int8 gets its speed on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A digits student big enough for int8 to matter (the default student has 1,442 parameters,
# where the program's graph outweighs its weights): conv 32-64, depth 2, hidden 128.
DIGITS = ["model.student.channels=[32,64]", "model.student.depth=2", "model.student.hidden=128"]
CIFAR = ["experiment=cifar100_resnet32x4_resnet8x4", "cifar_row=kd", "data.val_size=500",
         "data.num_workers=0", "trainer.limit_val_batches=4", "trainer.limit_test_batches=4"]


def variants(epochs: int) -> dict[str, list[str]]:
    """Compression settings per row: the dense run and each callback, alone and together."""
    # Compression starts on a trained student (the report's dense row is the student then),
    # pruning ends with epochs left to fine-tune, and QAT fine-tunes the last third.
    prune_start = epochs // 5
    prune_end = max(prune_start + 1, (2 * epochs) // 3)
    qat_start = max(prune_end, epochs - max(1, epochs // 3))
    agp = ["callbacks.prune.final_sparsity=0.8", f"callbacks.prune.start_epoch={prune_start}",
           f"callbacks.prune.end_epoch={prune_end}"]
    return {
        "dense": ["callbacks=default"],
        "prune_agp 0.8": ["callbacks=prune_agp", *agp],
        "prune_channels 0.5": ["callbacks=prune_channels", "callbacks.prune.amount=0.5",
                               f"callbacks.prune.start_epoch={prune_start}"],
        "qat": ["callbacks=qat", f"callbacks.qat.start_epoch={qat_start}"],
        "prune_agp 0.8 + qat": ["callbacks=[prune_agp,qat]", *agp, f"callbacks.qat.start_epoch={qat_start}"],
    }


def run_one(overrides: list[str], root: Path, name: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from kd.cli import config_dir
    from kd.training.run import run

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = str(root)
        cfg.paths.output_dir = str(root / "runs" / name.replace(" ", "_").replace("+", "and"))
        cfg.trainer.enable_progress_bar = False
    return run(cfg)


def table(title: str, results: dict[str, dict]) -> str:
    head = f"{'variant':<20} {'model':<23} {'params':>9} {'non-zero':>9} {'sparsity':>8} {'size':>9} " \
           f"{'ms@1':>8} {'ms@64':>8} {'test acc':>8}"
    lines = [title, head, "-" * len(head)]
    for variant, res in results.items():
        for row in res["report"]["rows"]:
            if row["name"] == "teacher" and variant != next(iter(results)):
                continue
            acc = "-" if row["test_acc"] is None else f"{100 * row['test_acc']:.2f}"
            lat = row["latency_ms"]
            lines.append(
                f"{variant:<20} {row['name'] + (' int8' if row.get('int8') else ''):<23} {row['params']:>9,} "
                f"{row['nonzero_params']:>9,} {100 * row['sparsity']:>7.1f}% {row['size_bytes'] / 1e3:>7.1f}kB "
                f"{lat.get('b1', float('nan')):>8.3f} {lat.get('b64', float('nan')):>8.3f} {acc:>8}"
            )
        ratios = res["report"].get("ratios")
        if ratios:
            lines.append(f"{'':<20} dense/compressed: " + ", ".join(f"{k} x{v:g}" for k, v in ratios.items()))
    return "\n".join(lines)


def lowered(title: str, results: dict[str, dict]) -> str:
    """Latency of the dense and int8 programs eager and after ``lower_for_x86``, loaded from their files."""
    import torch

    from kd.compress.artifacts import input_shape_of, load_artifact
    from kd.compress.pt2e import lower_for_x86
    from kd.compress.report import latency_ms

    head = f"{'variant':<20} {'program':<9} {'compile s':>9} {'max |diff|':>10} " + " ".join(
        f"{f'ms@{b} eager':>12} {f'ms@{b} lowered':>14}" for b in (1, 64)
    )
    lines = [f"{title}: x86 lowering", head, "-" * len(head)]
    for variant, res in results.items():
        report = res["report"]
        int8 = any(row.get("int8") for row in report["rows"])
        if variant != "dense" and not int8:
            continue
        model = load_artifact(Path(report["artifacts"]["program"]))
        shape = input_shape_of(model)
        eager = {b: latency_ms(model, shape, b, warmup=3, repeats=20) for b in (1, 64)}  # before any compiling
        start = time.time()
        fast = lower_for_x86(model, shape)  # compiles for batch 1; batch 64 compiles in its warm-up
        compile_s = time.time() - start
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))  # (8, C, H, W)
        with torch.no_grad():
            diff = float((fast(x) - model(x)).abs().max())
        times = " ".join(
            f"{eager[b]:>12.3f} {latency_ms(fast, shape, b, warmup=3, repeats=20):>14.3f}" for b in (1, 64)
        )
        lines.append(f"{variant:<20} {'int8' if int8 else 'fp32':<9} {compile_s:>9.1f} {diff:>10.2e} {times}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["digits", "cifar", "all"], default="all")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (digits 30, cifar 5)")
    parser.add_argument("--lower", action="store_true", help="also time the programs after x86 lowering")
    parser.add_argument("--json", type=Path, default=None, help="also write all reports to this file")
    args = parser.parse_args()

    import torch

    from tests.datagen import write_cifar

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kd-compress-bench-") as tmp:
        root = Path(tmp)
        workloads = {}
        if args.workload in ("digits", "all"):
            epochs = args.epochs or 30
            workloads["digits (digits_cnn -> conv 32-64 student, KD)"] = [*DIGITS, f"trainer.max_epochs={epochs}"], epochs
        if args.workload in ("cifar", "all"):
            epochs = args.epochs or 5
            data = write_cifar(root / "data", n_train=2000, n_test=256)
            teacher = ["teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=5"]
            workloads["CIFAR-100-shaped (resnet32x4 -> resnet8x4, KD, generated data)"] = (
                [*CIFAR, f"data.root={data}", f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=10", *teacher],
                epochs,
            )
        for title, (base, epochs) in workloads.items():
            results = {}
            for variant, extra in variants(epochs).items():
                start = time.time()
                teacher = [] if variant == "dense" else ["report.teacher=false"]  # timed once per workload
                results[variant] = run_one([*base, *extra, *teacher], root, f"{title[:6]}-{variant}")
                print(f"[{title[:6]}] {variant}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
            out[title] = {k: v["report"] for k, v in results.items()}
            print(table(title, results), flush=True)
            print(flush=True)
            if args.lower:
                print(lowered(title, results), flush=True)
                print(flush=True)
    print(f"machine: {torch.get_num_threads()} CPU threads; latency = median of 20 timed runs after 3 warm-up, "
          "eager torch.export programs (int8 not lowered)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
