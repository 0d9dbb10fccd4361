"""Images/s of leukolab's MAE and DINO training steps vs minimal hand-written reference steps.

For each method the same model (same seed, same weights), batch and mask ratio /
crops are trained twice on the same in-memory batches, alternating, in one
process:

* **leukolab** -- the objective (:class:`~leukolab.objectives.mae.MAEObjective`,
  :class:`~leukolab.objectives.dino.DINOObjective`) through the real
  :class:`~leukolab.training.loop.Trainer` epoch (``move_to``, autocast on CUDA,
  grad clipping, warm-up/cosine scheduler, ``on_train_step_end`` EMA hook,
  logging, progress bar; no checkpoint writing);
* **reference** -- a bare loop written here: MAE-paper masking + encoder on the
  visible tokens + decoder + masked MSE, or DINO teacher/student forward + loss
  + centre + EMA, then ``backward`` and ``AdamW.step``.

The ratio leukolab / reference is the price of the shared loop and objective
code (target >= 0.9). The per-image cost of the data transforms (MAE crop,
DINO multi-crop) over cached decoded PNGs is printed too, as it is not part of
the step.

    python benchmarks/pretrain_throughput.py [--img-size 64] [--steps 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from leukolab.data.dataset import ImageDataset
from leukolab.data.multicrop import MultiCropTransform, MultiCropViews
from leukolab.data.readers import list_images
from leukolab.data.synthetic import make_pool
from leukolab.data.transforms import mae_transform
from leukolab.models.mae import patchify
from leukolab.objectives.dino import DINOObjective
from leukolab.objectives.mae import MAEObjective
from leukolab.training.loop import Trainer, TrainerConfig, move_to


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- models and data
def make_mae(args: argparse.Namespace) -> MAEObjective:
    torch.manual_seed(0)
    return MAEObjective(args.backbone, args.img_size, mask_ratio=args.mask_ratio).to(args.device)


def make_dino(args: argparse.Namespace) -> DINOObjective:
    torch.manual_seed(0)
    return DINOObjective(args.backbone, args.img_size, out_dim=args.out_dim).to(args.device)


def mae_batches(args: argparse.Namespace) -> list:
    g = torch.Generator().manual_seed(0)
    s = args.img_size
    return [(torch.randn(args.batch, 3, s, s, generator=g), torch.zeros(args.batch)) for _ in range(args.steps)]


def dino_batches(args: argparse.Namespace) -> list:
    g = torch.Generator().manual_seed(0)
    b, s, ls = args.dino_batch, args.img_size, args.local_size
    return [
        ([torch.randn(b, 3, s, s, generator=g) for _ in range(2)]
         + [torch.randn(b, 3, ls, ls, generator=g) for _ in range(args.local_crops)], torch.zeros(b))
        for _ in range(args.dino_steps)
    ]


# --------------------------------------------------------------------------- reference steps
def reference_mae(args: argparse.Namespace, data: list) -> float:
    """A bare MAE loop (He et al. reference code) on the same modules."""
    mae = make_mae(args).train().model
    vit = mae.encoder
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    n, keep, npre = mae.num_patches, mae.num_keep, mae.num_prefix
    sync(args.device)
    t = time.perf_counter()
    for x, _ in data:
        x = x.to(args.device)
        b = x.shape[0]
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = noise.argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        tok = vit.patch_embed(x) + vit.pos_embed[:, npre:]
        patches = torch.gather(tok, 1, ids_keep[..., None].expand(-1, -1, tok.shape[-1]))
        cls = (vit.cls_token + vit.pos_embed[:, :npre]).expand(b, -1, -1)
        lat = vit.norm(vit.blocks(torch.cat([cls, patches], 1)))
        y = mae.decoder_embed(lat)
        d = y.shape[-1]
        full = torch.cat([y[:, npre:], mae.mask_token.expand(b, n - keep, d)], 1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, d)) + mae.decoder_pos_embed
        y = mae.decoder_norm(mae.decoder_blocks(torch.cat([y[:, :npre], full], 1)))
        pred = mae.decoder_pred(y[:, npre:])
        target = patchify(x, mae.patch)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(args.device)
    return len(data) * data[0][0].shape[0] / (time.perf_counter() - t)


def reference_dino(args: argparse.Namespace, data: list) -> float:
    """A bare DINO loop (Caron et al. reference code) on the same modules."""
    dino = make_dino(args).train()
    student, teacher = dino.student, dino.teacher
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=1e-4, weight_decay=0.04)
    center = torch.zeros(1, args.out_dim, device=args.device)
    total = len(data)
    sync(args.device)
    t = time.perf_counter()
    for it, (views, _) in enumerate(data):
        views = [v.to(args.device) for v in views]
        nv = len(views)
        with torch.no_grad():
            t_out = teacher.head(teacher.backbone(torch.cat(views[:2])))
        groups = [views[:2], views[2:]] if nv > 2 else [views[:2]]
        s_out = torch.cat([student.head(student.backbone(torch.cat(g))) for g in groups])
        s_chunks = (s_out / 0.1).chunk(nv)
        t_chunks = F.softmax((t_out - center) / 0.04, dim=-1).chunk(2)
        loss, pairs = 0.0, 0
        for iq, q in enumerate(t_chunks):
            for v in range(nv):
                if v != iq:
                    loss = loss + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
                    pairs += 1
        loss = loss / pairs
        center = center * 0.9 + t_out.mean(0, keepdim=True) * 0.1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m = 1 - (1 - 0.996) * (math.cos(math.pi * (it + 1) / total) + 1) / 2
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    sync(args.device)
    return len(data) * data[0][0][0].shape[0] / (time.perf_counter() - t)


# --------------------------------------------------------------------------- leukolab steps
def leukolab_loop(args: argparse.Namespace, objective: torch.nn.Module, data: list, run_dir: Path) -> float:
    cfg = TrainerConfig(epochs=1, lr=1e-4, warmup_epochs=0.1, keep_last=0, device=args.device, progress=True,
                        grad_clip=3.0)
    trainer = Trainer(objective, cfg, run_dir)
    trainer._build_scheduler(len(data))
    sync(args.device)
    t = time.perf_counter()
    trainer._train_epoch(data, len(data))
    sync(args.device)
    views = data[0][0]
    b = views[0].shape[0] if isinstance(views, list) else views.shape[0]
    return len(data) * b / (time.perf_counter() - t)


def transform_cost(args: argparse.Namespace) -> dict[str, float]:
    """ms per image of the MAE and DINO transforms over cached decoded PNGs."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = make_pool(Path(tmp) / "pool", 32, size=args.img_size, seed=0, progress=False)
        paths = list_images(pool)
        tfs = {"mae crop": mae_transform(args.img_size),
               f"dino multi-crop (2+{args.local_crops})": MultiCropTransform(MultiCropViews(
                   args.img_size, args.local_size, args.local_crops))}
        for name, tf in tfs.items():
            ds = ImageDataset(paths, None, tf, cache=True)
            for i in range(len(ds)):
                ds[i]
            t = time.perf_counter()
            for i in range(len(ds)):
                move_to(ds[i], torch.device("cpu"))
            out[name] = (time.perf_counter() - t) / len(ds) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="MAE batch")
    p.add_argument("--steps", type=int, default=8, help="MAE steps per repeat")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--dino-batch", type=int, default=32)
    p.add_argument("--dino-steps", type=int, default=6)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {"mae": {"reference": [], "leukolab": []},
                                                  "dino": {"reference": [], "leukolab": []}}
    mae_data, dino_data = mae_batches(args), dino_batches(args)
    reference_mae(args, mae_data[:2])  # warm-up
    reference_dino(args, dino_data[:1])
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            results["mae"]["reference"].append(reference_mae(args, mae_data))
            results["mae"]["leukolab"].append(leukolab_loop(args, make_mae(args), mae_data, Path(tmp)))
            results["dino"]["reference"].append(reference_dino(args, dino_data))
            results["dino"]["leukolab"].append(leukolab_loop(args, make_dino(args), dino_data, Path(tmp)))
            print(f"repeat {r + 1}: " + ", ".join(
                f"{m} {k} {v[-1]:.1f} img/s" for m, res in results.items() for k, v in res.items()), flush=True)
    costs = transform_cost(args)
    dev = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{args.backbone} @ {args.img_size}px on {dev}; MAE batch {args.batch}, mask ratio {args.mask_ratio}; "
          f"DINO batch {args.dino_batch}, 2x{args.img_size}px + {args.local_crops}x{args.local_size}px crops, "
          f"out_dim {args.out_dim}")
    print("| method | reference img/s | leukolab img/s | ratio (target >= 0.9) |")
    print("|---|---:|---:|---:|")
    for m, res in results.items():
        ref, ours = max(res["reference"]), max(res["leukolab"])
        print(f"| {m} | {ref:.1f} | {ours:.1f} | {ours / ref:.3f} |")
    print("\ndata transforms (not in the step, cached decode): "
          + ", ".join(f"{k} {v:.2f} ms/img" for k, v in costs.items()))
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
