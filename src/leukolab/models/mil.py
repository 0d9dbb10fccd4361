"""Multiple-instance aggregators: a patient's cells (and clinical data) in, a diagnosis out.

Every aggregator takes a padded batch of bags -- ``x`` ``(B, N, D)`` cell
embeddings, ``mask`` ``(B, N)`` (True for real cells), ``clinical`` ``(B, C)`` --
and returns :class:`MILOutput`: class logits and, per bag, non-negative weights
over its cells that sum to one and are zero on padding (what the model looked at;
the attention gallery draws them). Padding never changes a prediction.

Registered in :data:`leukolab.registry.AGGREGATORS` (build with
``AGGREGATORS.build(name, in_dim=D, clinical_dim=C, **kwargs)``):

* ``mean`` / ``max`` - pooling of the embedded cells;
* ``abmil`` - gated attention MIL (Ilse, Tomczak & Welling 2018);
* ``transformer`` - self-attention across a patient's cells with a class token
  (weights: the class token's attention in the last block);
* ``xattn`` - clinical cross-attention: one token per clinical feature (plus a
  learned query) attends to the cells after a self-attention block (seed 002);
* ``moe`` - mixture of experts (Sahasrabudhe et al. 2021): an attention-MIL image
  expert, a logistic clinical expert and a learned gate mixing their probabilities;
* ``clinical`` - the clinical features alone (logistic regression; cells ignored).

With ``clinical_dim`` > 0, ``mean``, ``max``, ``abmil``, ``transformer`` and
``xattn`` fuse late: their logits add a logistic model of the standardised
clinical vector to the image head's (trained for itself too, see
:meth:`Aggregator.forward`). Inputs are standardised inside the model with statistics of the
training set (:meth:`Aggregator.set_normalisation`), stored as buffers, so a
checkpoint carries everything a prediction needs.

Why not torchmil's ABMIL/TransMIL: see the MIL design notes in the README (a
short module here, masks and clinical fusion are ours in either case).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leukolab.errors import LeukolabError
from leukolab.registry import AGGREGATORS

__all__ = [
    "Aggregator",
    "MILOutput",
    "build_aggregator",
    "masked_softmax",
]


@dataclass
class MILOutput:
    """What an aggregator returns.

    Attributes:
        logits: ``(B, K)`` class scores (log-probabilities for ``moe``).
        attention: ``(B, N)`` weights over the cells: >= 0, summing to 1 over each
            bag's real cells, 0 on padding.
        aux_logits: logits trained for themselves too: ``moe``'s experts, late fusion's clinical branch.
        extras: other per-bag values worth reporting (``gate`` of ``moe``).
    """

    logits: Tensor
    attention: Tensor
    aux_logits: tuple[Tensor, ...] = ()
    extras: dict[str, Tensor] = field(default_factory=dict)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax of ``scores`` over the last dimension where ``mask`` is True; exactly 0 elsewhere."""
    w = scores.float().masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.nan_to_num(w, nan=0.0) * mask


def _uniform(mask: Tensor) -> Tensor:
    m = mask.float()
    return m / m.sum(-1, keepdim=True).clamp_min(1.0)


class Aggregator(nn.Module):
    """Base class: input standardisation, a cell embedding ``D -> hidden``, a linear head, late clinical fusion.

    Subclasses implement :meth:`pool` (embedded cells -> one vector per bag plus
    weights over the cells); ``forward`` does the rest.

    Args:
        in_dim: cell embedding size ``D``.
        clinical_dim: number of clinical features ``C`` (0: image only).
        num_classes: output classes.
        hidden: width of the embedded cells.
        dropout: dropout on the embedded cells and before the head.
    """

    #: the aggregator needs clinical features
    needs_clinical: bool = False
    #: the aggregator looks at the cells
    uses_cells: bool = True

    def __init__(self, in_dim: int, clinical_dim: int = 0, num_classes: int = 2, hidden: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or num_classes < 2:
            raise LeukolabError(f"aggregator sizes in_dim={in_dim}, hidden={hidden}, classes={num_classes} are invalid")
        if self.needs_clinical and clinical_dim < 1:
            raise LeukolabError(f"aggregator {type(self).name!r} needs clinical features; "
                                "pass some with --clinical-features")
        self.in_dim, self.clinical_dim, self.num_classes, self.hidden = in_dim, clinical_dim, num_classes, hidden
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.register_buffer("clin_mean", torch.zeros(clinical_dim))
        self.register_buffer("clin_std", torch.ones(clinical_dim))
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    name: str = "aggregator"

    @torch.no_grad()
    def set_normalisation(self, cells: Tensor | None, clinical: Tensor | None) -> None:
        """Standardise inputs with these training statistics: ``cells`` ``(M, D)``, ``clinical`` ``(N, C)``."""
        if cells is not None and len(cells):
            self.in_mean.copy_(cells.float().mean(0))
            self.in_std.copy_(cells.float().std(0).nan_to_num(1.0).clamp_min(1e-4))
        if clinical is not None and self.clinical_dim and len(clinical):
            self.clin_mean.copy_(clinical.float().mean(0))
            self.clin_std.copy_(clinical.float().std(0).nan_to_num(1.0).clamp_min(1e-4))

    @torch.no_grad()
    def init_clinical(self, coef: Tensor, intercept: float) -> None:
        """Start the clinical branch as a fitted logistic regression on the *standardised* clinical features
        (``coef`` ``(C,)``, ``intercept``: the log-odds of class 1), and the image head at zero, so that an
        untrained model predicts what the clinical data alone say and the image adds to it."""
        head = self.clinical_head if isinstance(getattr(self, "clinical_head", None), nn.Linear) else None
        if head is None or self.num_classes != 2:
            return
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = coef.to(head.weight)
        head.bias[1] = float(intercept)
        if isinstance(getattr(self, "head", None), nn.Linear):
            self.head.weight.zero_()
            self.head.bias.zero_()

    def embed_cells(self, x: Tensor) -> Tensor:
        """``(B, N, D)`` -> ``(B, N, hidden)``."""
        return self.embed((x.float() - self.in_mean) / self.in_std)

    def standard_clinical(self, clinical: Tensor | None, batch: int) -> Tensor:
        """``(B, C)`` standardised clinical features (``(B, 0)`` without any)."""
        if not self.clinical_dim:
            return torch.zeros(batch, 0, device=self.in_mean.device)
        if clinical is None or clinical.shape[-1] != self.clinical_dim:
            got = None if clinical is None else clinical.shape[-1]
            raise LeukolabError(f"the model takes {self.clinical_dim} clinical features, got {got}")
        return (clinical.float() - self.clin_mean) / self.clin_std

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled (B, P), weights (B, N))`` from embedded cells ``h``, ``mask`` and standardised clinical ``z``."""
        raise NotImplementedError

    def pooled_dim(self) -> int:
        """``P``, the size of :meth:`pool`'s vector."""
        return self.hidden

    def make_head(self) -> None:
        """The linear heads (called at the end of a subclass's ``__init__``): one over the pooled bag vector
        and, with clinical features, a logistic one over them."""
        self.head = nn.Linear(self.pooled_dim(), self.num_classes)
        self.clinical_head = nn.Linear(self.clinical_dim, self.num_classes) if self.clinical_dim else None

    def forward(self, x: Tensor, mask: Tensor, clinical: Tensor | None = None) -> MILOutput:
        """Class logits and cell weights of a padded batch of bags.

        With clinical features the logits are ``head(bag) + clinical_head(z)``: the
        image adds evidence to a logistic model of the clinical data, whose own
        logits are returned in ``aux_logits`` so that the objective trains it for
        itself too (on a few dozen patients the image branch alone can fit the
        training set and would otherwise leave the clinical weights untrained).
        """
        z = self.standard_clinical(clinical, x.shape[0])
        pooled, weights = self.pool(self.embed_cells(x), mask, z)
        logits = self.head(self.drop(pooled))
        if self.clinical_head is None:
            return MILOutput(logits, weights)
        clin = self.clinical_head(z)
        return MILOutput(logits + clin, weights, (clin,))


@AGGREGATORS.register("mean")
class MeanPool(Aggregator):
    """Mean of the embedded cells (every cell weighs ``1/n``)."""

    name = "mean"

    def __init__(self, in_dim: int, clinical_dim: int = 0, **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.make_head()

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        w = _uniform(mask)
        return torch.einsum("bn,bnd->bd", w, h), w


@AGGREGATORS.register("max")
class MaxPool(Aggregator):
    """Feature-wise maximum over the embedded cells; a cell's weight is its share of the maxima."""

    name = "max"

    def __init__(self, in_dim: int, clinical_dim: int = 0, **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.make_head()

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        filled = h.masked_fill(~mask[..., None], float("-inf"))
        pooled, arg = filled.max(1)
        counts = torch.zeros(mask.shape, device=h.device).scatter_add_(1, arg, torch.ones_like(arg, dtype=torch.float))
        return pooled, counts / h.shape[-1]


class GatedAttention(nn.Module):
    """Gated attention scores ``w^T (tanh(V h) * sigmoid(U h))`` (Ilse et al. 2018, eq. 9), softmax over a bag."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """``(B, N)`` weights over each bag's real cells."""
        return masked_softmax(self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1), mask)


@AGGREGATORS.register("abmil")
class AttentionMIL(Aggregator):
    """Gated attention MIL: the bag is the attention-weighted mean of its embedded cells."""

    name = "abmil"

    def __init__(self, in_dim: int, clinical_dim: int = 0, attn_dim: int = 64, **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.attention = GatedAttention(self.hidden, attn_dim)
        self.make_head()

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        w = self.attention(h, mask)
        return torch.einsum("bn,bnd->bd", w, h), w


class Block(nn.Module):
    """Pre-norm transformer block: (self- or cross-) attention with a key padding mask, then an MLP.

    ``forward(q, mask, kv)`` returns the updated queries and the head-averaged
    attention ``(B, Lq, Lk)``; ``kv`` defaults to ``q`` (self-attention).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1, cross: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise LeukolabError(f"hidden size {dim} is not a multiple of {heads} attention heads")
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, mask: Tensor, kv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hq = self.norm_q(q)
        hkv = hq if kv is None or self.norm_kv is None else self.norm_kv(kv)
        out, w = self.attn(hq, hkv, hkv, key_padding_mask=~mask, need_weights=True, average_attn_weights=True)
        q = q + self.drop(out)
        return q + self.drop(self.mlp(self.norm_mlp(q))), w


@AGGREGATORS.register("transformer")
class TransformerMIL(Aggregator):
    """Self-attention across a patient's cells with a class token; the class token's output is the bag.

    Cell weights: the class token's attention to the cells in the last block
    (averaged over heads, renormalised over the cells).
    """

    name = "transformer"

    def __init__(self, in_dim: int, clinical_dim: int = 0, layers: int = 2, heads: int = 4,
                 **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.hidden))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(self.hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(self.hidden)
        self.make_head()

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        tokens = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1)
        full = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        w = torch.zeros(1)
        for block in self.blocks:
            tokens, w = block(tokens, full)
        cw = w[:, 0, 1:] * mask
        return self.norm(tokens[:, 0]), cw / cw.sum(-1, keepdim=True).clamp_min(1e-12)


@AGGREGATORS.register("xattn")
class ClinicalCrossAttention(Aggregator):
    """Clinical tokens attend to the cells (seed 002's "cross-attention from clinical data to cells").

    Each clinical feature ``c`` becomes a token ``t_c + z_c * s_c`` (learned ``t``, ``s``),
    joined by one learned query; the cells first pass ``self_layers`` self-attention
    blocks; the queries then attend to them; the mean of the query outputs (and the
    clinical vector) feeds the head. Cell weights: the cross-attention averaged over
    heads and queries.
    """

    name = "xattn"
    needs_clinical = True

    def __init__(self, in_dim: int, clinical_dim: int = 0, self_layers: int = 1, heads: int = 4,
                 **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        d = self.hidden
        self.token = nn.Parameter(torch.randn(clinical_dim + 1, d) * 0.02)
        self.scale = nn.Parameter(torch.randn(clinical_dim, d) * 0.02)
        self.self_blocks = nn.ModuleList(Block(d, heads) for _ in range(self_layers))
        self.cross = Block(d, heads, cross=True)
        self.norm = nn.LayerNorm(d)
        self.make_head()

    def pool(self, h: Tensor, mask: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.self_blocks:
            h, _ = block(h, mask)
        clin = self.token[None, :-1] + z[..., None] * self.scale[None]  # (B, C, d)
        queries = torch.cat([clin, self.token[None, -1:].expand(h.shape[0], -1, -1)], 1)
        out, w = self.cross(queries, mask, h)
        return self.norm(out.mean(1)), w.mean(1) * mask


@AGGREGATORS.register("moe")
class MixtureOfExperts(Aggregator):
    """An image expert (gated attention MIL), a clinical expert (logistic) and a gate (Sahasrabudhe et al. 2021).

    ``p = g * p_image + (1 - g) * p_clinical`` with ``g = sigmoid(gate([bag vector, clinical]))``;
    the logits are ``log p``. Both experts' own logits are returned in
    ``aux_logits`` (the objective may add their losses), the gate in ``extras``.
    """

    name = "moe"
    needs_clinical = True

    def __init__(self, in_dim: int, clinical_dim: int = 0, attn_dim: int = 64, **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.attention = GatedAttention(self.hidden, attn_dim)
        self.image_head = nn.Linear(self.hidden, self.num_classes)
        self.clinical_head = nn.Linear(clinical_dim, self.num_classes)
        self.gate = nn.Linear(self.hidden + clinical_dim, 1)

    def forward(self, x: Tensor, mask: Tensor, clinical: Tensor | None = None) -> MILOutput:
        z = self.standard_clinical(clinical, x.shape[0])
        h = self.embed_cells(x)
        w = self.attention(h, mask)
        bag = self.drop(torch.einsum("bn,bnd->bd", w, h))
        image, clin = self.image_head(bag), self.clinical_head(z)
        g = torch.sigmoid(self.gate(torch.cat([bag, z], -1)))
        p = g * image.softmax(-1) + (1 - g) * clin.softmax(-1)
        return MILOutput(torch.log(p.clamp_min(1e-8)), w, (image, clin), {"gate": g.squeeze(-1)})


@AGGREGATORS.register("clinical")
class ClinicalOnly(Aggregator):
    """Logistic regression on the standardised clinical features; the cells are ignored (uniform weights)."""

    name = "clinical"
    needs_clinical = True
    uses_cells = False

    def __init__(self, in_dim: int, clinical_dim: int = 0, **kwargs: int | float) -> None:
        super().__init__(in_dim, clinical_dim, **kwargs)  # type: ignore[arg-type]
        self.linear = nn.Linear(clinical_dim, self.num_classes)

    def forward(self, x: Tensor, mask: Tensor, clinical: Tensor | None = None) -> MILOutput:
        return MILOutput(self.linear(self.standard_clinical(clinical, x.shape[0])), _uniform(mask))


def build_aggregator(name: str, in_dim: int, clinical_dim: int = 0, **kwargs: int | float) -> Aggregator:
    """``AGGREGATORS.build(name, ...)``: an unknown name or options it does not take are one-line errors."""
    factory = AGGREGATORS.get(name)
    try:
        return factory(in_dim=in_dim, clinical_dim=clinical_dim, **kwargs)
    except TypeError as exc:
        raise LeukolabError(f"aggregator {name!r}: bad option(s) {sorted(kwargs)} ({exc})") from None
