"""``leukolab export RUN --merge --out CKPT``: a trained run's backbone as a plain timm-named checkpoint.

With ``--merge`` a LoRA run's low-rank updates are folded into the frozen
backbone's weights (``W + (alpha / r) B A``), so the result is an ordinary
backbone -- ``backbone`` (timm names) + ``backbone_spec`` -- that ``--init``,
``embed``, ``probe`` and timm read like any other. A run without an adapter is
exported as it is; prompt, bottleneck and AdaptFormer runs add modules of their
own and cannot be folded into a plain backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leukolab.checkpoints import CHECKPOINT_FORMAT, BackboneSpec, load_checkpoint, save_checkpoint
from leukolab.errors import LeukolabError

__all__ = ["export_run"]


def _run_state(run: Path) -> tuple[Path, dict[str, Any]]:
    path = run / "best.pt" if run.is_dir() else run
    if not path.is_file():
        raise LeukolabError(f"{run}: no best.pt; expected a finished leukolab train run folder or its checkpoint")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not state.get("backbone_spec"):
        raise LeukolabError(f"{path} holds no backbone_spec; expected a leukolab run checkpoint")
    return path, state


def export_run(run: Path | str, out: Path | str, *, merge: bool = False) -> Path:
    """Write the backbone of ``run`` (a run folder or its ``best.pt``) to the new file ``out``.

    Args:
        run: a ``leukolab train`` run folder or checkpoint.
        out: the checkpoint to write (refused if it exists).
        merge: fold the run's LoRA adapter into the backbone weights (required for LoRA runs).

    Raises:
        LeukolabError: ``out`` exists; ``merge`` on a run without LoRA; an adapter run
            without ``merge``; the run's frozen ``--init`` backbone is gone or changed.
    """
    run, out = Path(run), Path(out)
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    path, state = _run_state(run)
    spec = BackboneSpec.from_dict(state["backbone_spec"])
    record = state.get("adapter")
    name = record["config"]["name"] if isinstance(record, dict) else None
    if merge and name != "lora":
        what = f"the {name} adapter" if name else "no adapter"
        raise LeukolabError(f"export --merge: {run} was trained with {what}; expected a run trained with "
                            "--adapter lora (only LoRA folds into the backbone weights)")
    if name is not None and not merge:
        hint = "pass --merge" if name == "lora" else f"the {name} adapter cannot be folded into a plain backbone"
        raise LeukolabError(f"export: {run} was trained with the {name} adapter; {hint}")
    if name is None:
        backbone = state.get("backbone")
        if not backbone:
            raise LeukolabError(f"{path} stores no backbone weights; expected a leukolab run checkpoint")
        merged_from = None
    else:
        from leukolab.models.adapters.state import restore_adapted_backbone

        net, adapter = restore_adapted_backbone(record, spec, state.get("backbone"), attach=False)
        backbone = adapter.merge(net.state_dict())
        merged_from = adapter.config()
    ckpt = {"format": CHECKPOINT_FORMAT, "backbone": {k: v.contiguous() for k, v in backbone.items()},
            "backbone_spec": spec.to_dict(), "exported_from": str(path.resolve()), "merged_adapter": merged_from}
    return save_checkpoint(ckpt, out, overwrite=False)
