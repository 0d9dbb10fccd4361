"""The root typer application, and the help texts that several command groups share.

Each ``cli/<group>.py`` module adds its commands to :data:`app`, or its
command group made by :func:`add_group`; :mod:`leukolab.cli.main` imports the
modules. CLI modules only parse arguments and call :mod:`leukolab.pipelines`
(imported inside each command, so ``leukolab --help`` stays fast).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Annotated, Any, Optional

import typer

from leukolab.errors import LeukolabError

app = typer.Typer(
    name="leukolab",
    help="Blood-smear images in, answers out: synthetic data, training, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (
    "leukolab run folder or checkpoint (classification or pretraining), a backbone written by "
    "'leukolab convert', or a raw DINOv2/timm ViT file."
)
NORM_HELP = "Input normalisation: leukolab or imagenet (default: the model's; imagenet for converted/external weights)."
ALLOW_PICKLE_HELP = "Read files holding Python objects (runs code from the file!)."


def add_group(name: str, help: str) -> typer.Typer:
    """A new command group ``leukolab NAME ...`` on :data:`app`."""
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


# --------------------------------------------------------------------------- adapter options (train, mil train)
LoraRank = Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank (default 8).")]
LoraAlpha = Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA scale alpha / rank (default 16).")]
LoraTargets = Annotated[Optional[str], typer.Option("--lora-targets",
                                                    help="Linear layers of each block (default qkv,proj).")]
PromptTokens = Annotated[Optional[int], typer.Option("--prompt-tokens", help="Prompt tokens (default 10).")]
PromptDeep = Annotated[Optional[bool], typer.Option("--prompt-deep/--prompt-shallow",
                                                    help="Prompts at every block (deep) or at the input (shallow).")]


@dataclass(frozen=True)
class AdapterOptions:
    """The adapter-specific command-line options that ``leukolab train`` and ``leukolab mil train`` share.

    ``None`` means "not given" (the packaged default or the ``--config`` file's value applies).
    """

    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: Optional[str] = None
    prompt_tokens: Optional[int] = None
    prompt_deep: Optional[bool] = None

    _FLAGS = (("--lora-rank", "lora", "lora.rank"), ("--lora-alpha", "lora", "lora.alpha"),
              ("--lora-targets", "lora", "lora.targets"), ("--prompt-tokens", "prompt", "prompt.tokens"),
              ("--prompt-deep", "prompt", "prompt.deep"))

    def overrides(self, prefix: str) -> dict[str, Any]:
        """Config overrides ``{prefix}.lora.rank`` ... (``None`` values are left to the config merge to skip)."""
        return {f"{prefix}.{key}": value for (_, _, key), value in zip(self._FLAGS, astuple(self), strict=True)}

    def check(self, adapter: Optional[str], *, require_adapter: bool = False, hint: str = "") -> None:
        """One-line error when an option belongs to another adapter, or (``require_adapter``) to none given.

        Args:
            adapter: the ``--adapter`` value (``None``: not given).
            require_adapter: refuse options given without any ``--adapter`` (they would be silently unused).
            hint: options that go with ``--adapter`` in this command, e.g. ``"--finetune-encoder "``.
        """
        for (flag, needs, _), value in zip(self._FLAGS, astuple(self), strict=True):
            if value is None:
                continue
            if adapter is not None and adapter != needs:
                raise LeukolabError(f"{flag} applies to --adapter {needs}, not --adapter {adapter}")
            if adapter is None and require_adapter:
                raise LeukolabError(f"{flag} applies to --adapter {needs}; expected it with {hint}--adapter {needs}")
