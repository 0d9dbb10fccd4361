"""Cost of DINO's multi-crop augmentation per batch: per-image vs batched, against one DINO training step.

Three timings per batch, on the same cached synthetic pool as ``leukolab pretrain`` reads it
(:class:`~leukolab.data.dataset.ImageDataset` with ``cache=True`` and ``max_side = 2 * img_size``):

* **per-image** -- :class:`~leukolab.data.multicrop.MultiCropTransform` on every image, then the default
  collate (what a ``num_workers=0`` DataLoader does);
* **batched** -- the square base transform per image + collate, then
  :class:`~leukolab.data.multicrop.BatchedMultiCrop` on the whole batch (on ``--device``);
* **step** -- one DINO training step of the objective on those views: teacher forward on the global crops,
  student forward on all crops, loss, backward, AdamW step and the teacher EMA update.

The images are decoded and cached before timing (the first epoch's decode is not counted).

    python benchmarks/dino_augment.py [--batch 64] [--img-size 64] [--local-size 32] [--local-crops 4]
                                      [--threads 2] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import default_collate

from leukolab.data.dataset import ImageDataset
from leukolab.data.multicrop import BatchedMultiCrop, MultiCropTransform, MultiCropViews
from leukolab.data.readers import list_images
from leukolab.data.synthetic import make_pool
from leukolab.objectives.dino import DINOObjective


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], reps: int, device: str) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--source-size", type=int, default=360, help="side of the synthetic images before the cache shrink")
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev, b = args.device, args.batch
    views = MultiCropViews(args.img_size, args.local_size, args.local_crops)
    per_image, batched = MultiCropTransform(views), BatchedMultiCrop(views)
    with tempfile.TemporaryDirectory() as tmp:
        paths = list_images(make_pool(Path(tmp) / "pool", b, size=args.source_size, seed=0, progress=False))
        ds_img = ImageDataset(paths, None, per_image, cache=True, max_side=2 * args.img_size)
        ds_base = ImageDataset(paths, None, batched.base_transform(), cache=True, max_side=2 * args.img_size)
        for ds in (ds_img, ds_base):  # decode once into the cache
            for i in range(len(ds)):
                ds.pair(i)

        def run_per_image() -> list[torch.Tensor]:
            views, _ = default_collate([ds_img[i] for i in range(b)])
            return [v.to(dev) for v in views]

        def run_batched() -> list[torch.Tensor]:
            images, _ = default_collate([ds_base[i] for i in range(b)])
            return batched(images.to(dev))

        torch.manual_seed(0)
        t_img = timed(run_per_image, args.reps, dev)
        t_bat = timed(run_batched, args.reps, dev)
        base_only = timed(lambda: default_collate([ds_base[i] for i in range(b)]), args.reps, dev)

        dino = DINOObjective(args.backbone, args.img_size, out_dim=args.out_dim, local_size=args.local_size,
                             local_crops=args.local_crops).to(dev).train()
        opt = torch.optim.AdamW([q for q in dino.parameters() if q.requires_grad], lr=1e-4)
        views = run_batched()

        def step() -> None:
            out = dino.training_step((views, torch.zeros(b)))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            dino.on_train_step_end(1, 100)

        t_step = timed(step, args.reps, dev)

    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"batch {b}, 2 x {args.img_size} px + {args.local_crops} x {args.local_size} px from "
          f"{2 * args.img_size} px cached images, {args.backbone}, {args.threads} threads, device {dev}, "
          f"median of {args.reps}, load average {load}")
    print(f"{'':42s} {'ms/batch':>9s} {'x step':>7s}")
    rows = [("per-image MultiCropTransform + collate", t_img), ("batched (base transform + collate + crops)", t_bat),
            ("  of which base transform + collate", base_only), ("DINO training step", t_step)]
    for name, t in rows:
        print(f"{name:42s} {t * 1000:9.1f} {t / t_step:7.2f}")
    print(f"speed-up batched vs per-image: {t_img / t_bat:.1f}x")


if __name__ == "__main__":
    main()
