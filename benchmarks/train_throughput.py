"""Images/s of leukolab's training loop vs a bare hand-written PyTorch loop.

Both loops train the same model on the same in-memory batches, in the same
process, alternating, so the ratio measures the loop's own overhead (progress
bar, logging, scheduler, grad clipping, checkpoint-free epochs). A third
measurement times the real ``ImageDataset`` + ``DataLoader`` pipeline over
PNG files to report the data-loading share of a step. If ``lightning`` is
installed, a Lightning Fabric loop is timed too (design-notes evidence).

    python benchmarks/train_throughput.py [--backbone vit_tiny_patch16_224] [--img-size 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from leukolab.data.readers import read_labelled
from leukolab.data.synthetic import make_wbc_dataset
from leukolab.models.classifier import build_classifier
from leukolab.objectives.classification import ClassificationObjective
from leukolab.pipelines.classify import make_loader
from leukolab.training.loop import Trainer, TrainerConfig


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"backbone": args.backbone, "head": "linear", "drop_path": 0.0}
    return build_classifier(cfg, args.img_size, 5).to(args.device)


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g),
            torch.randint(0, 5, (args.batch,), generator=g),
        )
        for _ in range(args.steps)
    ]


def bare_loop(args: argparse.Namespace, data: list) -> float:
    model = make_model(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sync(args)
    t = time.perf_counter()
    for x, y in data:
        x, y = x.to(args.device), y.to(args.device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(args)
    return len(data) * args.batch / (time.perf_counter() - t)


def leukolab_loop(args: argparse.Namespace, data: list, run_dir: Path) -> float:
    model = make_model(args)
    objective = ClassificationObjective(model, [str(i) for i in range(5)])
    cfg = TrainerConfig(epochs=1, lr=1e-3, warmup_epochs=0, keep_last=0, device=args.device, progress=True)
    trainer = Trainer(objective, cfg, run_dir)
    trainer._build_scheduler(len(data))
    sync(args)
    t = time.perf_counter()
    trainer._train_epoch(data, len(data))
    sync(args)
    return len(data) * args.batch / (time.perf_counter() - t)


def fabric_loop(args: argparse.Namespace, data: list) -> float | None:
    try:
        from lightning.fabric import Fabric
    except ImportError:
        return None
    fabric = Fabric(accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1)
    model = make_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model, opt = fabric.setup(model, opt)
    sync(args)
    t = time.perf_counter()
    for x, y in data:
        x, y = x.to(fabric.device), y.to(fabric.device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        fabric.backward(loss)
        opt.step()
    sync(args)
    return len(data) * args.batch / (time.perf_counter() - t)


def data_share(args: argparse.Namespace, img_per_s: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = make_wbc_dataset(Path(tmp) / "d", max(1, args.batch * args.steps // 5 // 2), size=args.img_size,
                                seed=0, progress=False)
        data = read_labelled(root)["all"]
        loader = make_loader(data, data.class_names, args.img_size, args.batch, train=True, cache=True)
        for _ in loader:  # first epoch fills the decode cache
            pass
        t = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        load_s_per_img = (time.perf_counter() - t) / max(1, n)
    step_s_per_img = 1 / img_per_s
    return load_s_per_img, load_s_per_img / (load_s_per_img + step_s_per_img)


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    data = batches(args)
    bare_loop(args, data[:2])  # warm-up
    results: dict[str, list[float]] = {"bare": [], "leukolab": [], "fabric": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            results["bare"].append(bare_loop(args, data))
            results["leukolab"].append(leukolab_loop(args, data, Path(tmp)))
            fab = fabric_loop(args, data)
            if fab is not None:
                results["fabric"].append(fab)
            print(f"repeat {r + 1}: bare {results['bare'][-1]:.1f} img/s, leukolab {results['leukolab'][-1]:.1f} img/s"
                  + (f", fabric {fab:.1f} img/s" if fab is not None else ""))
    best = {k: max(v) for k, v in results.items() if v}
    ratio = best["leukolab"] / best["bare"]
    load_s, share = data_share(args, best["leukolab"])
    print(f"\n{args.backbone} @ {args.img_size}px, batch {args.batch}, {args.steps} steps, device {args.device}")
    print("| loop | img/s (best of repeats) | ratio to bare |")
    print("|---|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.1f} | {v / best['bare']:.3f} |")
    print(f"\nleukolab / bare ratio: {ratio:.3f} (target >= 0.95)")
    print(f"data loading (cached PNG decode + augmentation): {load_s * 1e3:.2f} ms/img = {share:.1%} of step time")


if __name__ == "__main__":
    main()
