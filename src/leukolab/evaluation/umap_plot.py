"""2-D maps of an embedding: UMAP (optional ``umap-learn``), t-SNE or PCA, as PNG and HTML.

The HTML is one self-contained file (inline SVG plus a few lines of inline
JavaScript for the hover box; no CDN, nothing fetched): every point shows its
image path, label and colour value on hover, and clicking a legend entry
hides or shows that group.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from leukolab.errors import LeukolabError
from leukolab.evaluation.features import FeatureSet
from leukolab.utils.files import atomic_write, write_text

__all__ = ["METHODS", "color_values", "embedding_plot", "plot_embedding_png", "project_2d", "write_embedding_html"]

METHODS = ("umap", "tsne", "pca")
UMAP_MISSING = "umap-learn is not installed; pip install 'leukolab[umap]' (or use --method pca or --method tsne)"
#: at most this many distinct values are coloured as categories (more numeric values: a colour scale)
MAX_CATEGORIES = 40


def project_2d(features: np.ndarray, method: str = "umap", seed: int = 0, normalise: bool = True) -> np.ndarray:
    """``(N, 2)`` coordinates of ``features`` by UMAP, t-SNE or PCA.

    ``normalise`` L2-normalises each row first (cosine geometry, as the kNN
    probe uses). UMAP needs the optional ``umap-learn`` package, imported
    only here.
    """
    if method not in METHODS:
        raise LeukolabError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise LeukolabError(f"a 2-D map needs at least 3 feature rows, got {x.shape[0] if x.ndim else 0}")
    if not np.isfinite(x).all():
        raise LeukolabError("the features contain NaN or infinite values")
    if normalise:
        x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    n = x.shape[0]
    if method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise LeukolabError(UMAP_MISSING) from None
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=seed)
        xy = reducer.fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=float(max(1.0, min(30.0, (n - 1) / 3))), init="pca",
                  random_state=seed).fit_transform(x)
    else:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
        if xy.shape[1] < 2:
            xy = np.column_stack([xy, np.zeros(n)])
    return np.asarray(xy, dtype=np.float64)


def color_values(fs: FeatureSet, color_by: str) -> pd.Series:
    """The per-row values to colour by: ``label``, ``path`` or an extra column (``source``, ``split`` ...)."""
    columns = {"path": fs.paths}
    if fs.labels is not None:
        columns["label"] = fs.labels
    if fs.extra is not None:
        for col in fs.extra.columns:
            columns.setdefault(str(col), fs.extra[col].tolist())
    if color_by not in columns:
        if color_by == "label":
            raise LeukolabError(
                f"the features have no labels; colour by one of: {', '.join(sorted(columns))}"
            )
        raise LeukolabError(f"--color-by {color_by!r}: no such column; expected one of: {', '.join(sorted(columns))}")
    return pd.Series(columns[color_by], name=color_by)


def _is_continuous(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and values.nunique() > MAX_CATEGORIES


def _category_colors(categories: list[str]) -> dict[str, str]:
    cmap = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
    return {c: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, c in enumerate(categories)}


def _point_colors(values: pd.Series) -> tuple[list[str], dict[str, str] | None]:
    if _is_continuous(values):
        v = values.to_numpy(dtype=np.float64)
        lo, hi = np.nanmin(v), np.nanmax(v)
        scaled = (v - lo) / (hi - lo if hi > lo else 1.0)
        cmap = plt.get_cmap("viridis")
        return [matplotlib.colors.to_hex(cmap(s)) for s in scaled], None
    text = values.astype(str)
    categories = sorted(text.unique())
    if len(categories) > MAX_CATEGORIES:
        raise LeukolabError(
            f"--color-by {values.name}: {len(categories)} distinct values, too many to colour; "
            f"expected at most {MAX_CATEGORIES} (e.g. label or source)"
        )
    palette = _category_colors(categories)
    return [palette[t] for t in text], palette


def plot_embedding_png(xy: np.ndarray, values: pd.Series, path: Path | str, title: str = "") -> Path:
    """Scatter plot PNG with a legend (categories) or colour bar (numbers)."""
    n = xy.shape[0]
    size = float(np.clip(3000 / max(n, 1), 2, 40))
    fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
    if _is_continuous(values):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values.to_numpy(dtype=np.float64), s=size, cmap="viridis",
                        linewidths=0)
        fig.colorbar(sc, ax=ax, label=str(values.name))
    else:
        _, palette = _point_colors(values)
        text = values.astype(str).to_numpy()
        for cat, col in (palette or {}).items():
            sel = text == cat
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=col, label=f"{cat} ({int(sel.sum())})",
                       linewidths=0, alpha=0.85)
        ax.legend(title=str(values.name), fontsize=8, title_fontsize=8, markerscale=max(1.0, 20 / size),
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    finally:
        plt.close(fig)


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
svg {{ border: 1px solid #ddd; background: #fff; }}
circle {{ stroke: none; }}
circle:hover {{ stroke: #000; stroke-width: 1.5px; }}
#tip {{ position: fixed; pointer-events: none; background: rgba(255,255,255,.95); border: 1px solid #999;
        padding: 4px 6px; font-size: 12px; display: none; max-width: 60ch; word-break: break-all; }}
.legend span {{ cursor: pointer; margin-right: 14px; white-space: nowrap; font-size: 13px; }}
.legend span.off {{ opacity: .3; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }}
</style></head><body>
<h3>{title}</h3>
<p style="font-size:13px">{subtitle}</p>
<div class="legend">{legend}</div>
<svg id="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">
{points}
</svg>
<div id="tip"></div>
<script>
(function () {{
  var tip = document.getElementById('tip');
  document.querySelectorAll('#plot circle').forEach(function (c) {{
    c.addEventListener('mousemove', function (e) {{
      tip.textContent = c.getAttribute('data-info');
      tip.style.display = 'block';
      tip.style.left = (e.clientX + 12) + 'px';
      tip.style.top = (e.clientY + 12) + 'px';
    }});
    c.addEventListener('mouseleave', function () {{ tip.style.display = 'none'; }});
  }});
  document.querySelectorAll('.legend span').forEach(function (s) {{
    s.addEventListener('click', function () {{
      s.classList.toggle('off');
      var g = s.getAttribute('data-group'), hide = s.classList.contains('off');
      document.querySelectorAll('#plot circle').forEach(function (c) {{
        if (c.getAttribute('data-group') === g) c.style.display = hide ? 'none' : '';
      }});
    }});
  }});
}})();
</script>
</body></html>
"""


def write_embedding_html(
    xy: np.ndarray,
    values: pd.Series,
    paths: list[str],
    labels: list[str] | None,
    path: Path | str,
    title: str = "",
    subtitle: str = "",
    width: int = 900,
    height: int = 700,
) -> Path:
    """A self-contained HTML scatter plot (inline SVG + inline JS); hover shows path, label and value."""
    colors, palette = _point_colors(values)
    pad = 12.0
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    px = pad + (xy[:, 0] - lo[0]) / span[0] * (width - 2 * pad)
    py = height - pad - (xy[:, 1] - lo[1]) / span[1] * (height - 2 * pad)
    radius = float(np.clip(600 / max(len(xy), 1) ** 0.5, 1.5, 6))
    groups = values.astype(str).tolist()
    lines = []
    for i in range(len(xy)):
        info = f"{paths[i]} | label: {labels[i] if labels is not None else '-'}"
        if values.name not in ("label", "path"):
            info += f" | {values.name}: {groups[i]}"
        lines.append(
            f'<circle cx="{px[i]:.1f}" cy="{py[i]:.1f}" r="{radius:.1f}" fill="{colors[i]}" fill-opacity="0.8" '
            f'data-group="{html.escape(groups[i], quote=True)}" data-info="{html.escape(info, quote=True)}"/>'
        )
    legend = ""
    if palette is not None:
        counts = pd.Series(groups).value_counts()
        legend = "".join(
            f'<span data-group="{html.escape(c, quote=True)}"><i style="background:{col}"></i>'
            f"{html.escape(c)} ({int(counts.get(c, 0))})</span>"
            for c, col in palette.items()
        )
    text = _HTML_TEMPLATE.format(
        title=html.escape(title), subtitle=html.escape(subtitle), legend=legend, width=width, height=height,
        points="\n".join(lines),
    )
    return write_text(path, text)


def embedding_plot(
    fs: FeatureSet,
    out_png: Path | str,
    color_by: str = "label",
    method: str = "umap",
    seed: int = 0,
    normalise: bool = True,
    title: str = "",
) -> tuple[Path, Path]:
    """Project ``fs`` to 2-D and write ``out_png`` and the HTML next to it (same stem).

    Refuses to overwrite either file; raises before any computation when one exists.
    """
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise LeukolabError(f"--out {out_png}: expected a .png file (the .html is written next to it)")
    out_html = out_png.with_suffix(".html")
    for p in (out_png, out_html):
        if p.exists():
            raise LeukolabError(f"{p} already exists; refusing to overwrite it")
    values = color_values(fs, color_by)
    xy = project_2d(fs.features, method, seed=seed, normalise=normalise)
    name = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}[method]
    title = title or f"{name} of {len(fs)} embeddings (dim {fs.dim}), coloured by {color_by}"
    plot_embedding_png(xy, values, out_png, title=title)
    meta = json.dumps({"method": method, "n": len(fs), "dim": fs.dim, "color_by": color_by, "seed": seed})
    write_embedding_html(xy, values, fs.paths, fs.labels, out_html, title=title, subtitle=meta)
    return out_png, out_html
