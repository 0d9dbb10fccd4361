"""One self-contained HTML page per run, or a comparison page for several runs.

:func:`collect_run` looks through a run folder (and its subfolders, a few
levels deep; ``checkpoints/`` and hidden folders are skipped) for what the
other commands write: ``config.yaml``, ``metrics.json`` (of ``evaluate``),
``history.csv``, ``probe.md`` / ``label_efficiency.md`` and other markdown
tables, and PNG figures (``curves.png``, ``confusion_matrix.png``,
``label_efficiency.png``, UMAP/PCA maps, attention grids,
``reconstructions.png`` ...; other PNGs only in the run folder itself, so
image data in subfolders stays out). :func:`write_report` renders whatever exists;
images are embedded as base64 PNG, so the page can be mailed or archived as
one file. Nothing is fetched from the internet.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from leukolab.errors import LeukolabError

__all__ = ["RunArtifacts", "collect_run", "markdown_to_html", "render_report", "write_report"]

#: folders never searched
SKIP_DIRS = frozenset({"checkpoints", "__pycache__", "masks"})
#: headline metrics of the comparison table, in order
HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "n")
#: image kinds in display order: (kind, pattern on the file name)
IMAGE_KINDS = (
    ("curves", re.compile(r"curves", re.I)),
    ("confusion matrix", re.compile(r"confusion", re.I)),
    ("label efficiency", re.compile(r"label_eff", re.I)),
    ("embedding map", re.compile(r"umap|tsne|t-sne|embedding|map", re.I)),
    ("PCA of patch features", re.compile(r"pca", re.I)),
    ("attention", re.compile(r"attention|attn", re.I)),
    ("reconstructions", re.compile(r"recon", re.I)),
    ("other figures", re.compile(r".")),
)


@dataclass
class RunArtifacts:
    """What one run folder holds (paths are absolute)."""

    root: Path
    config_text: str | None = None
    config: dict[str, Any] | None = None
    metrics: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    markdown: list[tuple[Path, str]] = field(default_factory=list)
    images: list[tuple[str, Path]] = field(default_factory=list)
    history: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        return self.root.name

    def is_empty(self) -> bool:
        return not (self.config_text or self.metrics or self.markdown or self.images or self.history is not None)

    def latest_metrics(self) -> dict[str, Any] | None:
        """The most recently written metrics.json (the last ``evaluate`` of the run)."""
        if not self.metrics:
            return None
        return max(self.metrics, key=lambda item: (item[0].stat().st_mtime, str(item[0])))[1]


def _walk(root: Path, max_depth: int) -> list[Path]:
    files: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < max_depth and entry.name not in SKIP_DIRS:
                    stack.append((entry, depth + 1))
            elif entry.is_file():
                files.append(entry)
    return sorted(files, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def _image_kind(path: Path) -> tuple[int, str]:
    for i, (kind, pattern) in enumerate(IMAGE_KINDS):
        if pattern.search(path.name):
            return i, kind
    return len(IMAGE_KINDS), "other figures"


def collect_run(root: Path | str, max_depth: int = 3, max_images: int = 40) -> RunArtifacts:
    """Gather the artefacts of a run folder; raises when the folder is missing or holds none."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise LeukolabError(f"{root} is not a folder; expected a leukolab run folder")
        raise LeukolabError(f"run folder {root} does not exist")
    art = RunArtifacts(root=root.resolve())
    files = _walk(art.root, max_depth)
    images: list[tuple[int, int, str, Path]] = []  # (depth, kind order, kind, path)
    for f in files:
        suffix = f.suffix.lower()
        if f.name == "config.yaml" and art.config_text is None:
            art.config_text = f.read_text(encoding="utf-8", errors="replace")
            try:
                loaded = yaml.safe_load(art.config_text)
                art.config = loaded if isinstance(loaded, dict) else None
            except yaml.YAMLError:
                art.config = None
        elif f.name == "metrics.json" or (suffix == ".json" and f.name.endswith("_metrics.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                art.metrics.append((f, data))
        elif suffix == ".md":
            art.markdown.append((f, f.read_text(encoding="utf-8", errors="replace")))
        elif f.name == "history.csv" and f.parent == art.root:
            try:
                art.history = pd.read_csv(f)
            except Exception:
                art.history = None
        elif suffix == ".png":
            order, kind = _image_kind(f)
            # figures anywhere; other PNGs (image data, e.g. class folders) only at the run's top level
            if kind != "other figures" or f.parent == art.root:
                images.append((len(f.relative_to(art.root).parts), order, kind, f))
    # the run's own figures (and its eval/ folder's) before those of runs nested in it, so that an
    # experiment's label_efficiency.png is not crowded out by its cells' curves
    images.sort(key=lambda t: (t[0] > 2, t[1], t[0], str(t[3])))
    art.images = [(kind, path) for _, _, kind, path in images[:max_images]]
    if art.is_empty():
        raise LeukolabError(
            f"{root}: nothing to report (no config.yaml, metrics.json, history.csv, .md tables or .png figures "
            f"within {max_depth} folder levels); expected a leukolab run folder"
        )
    return art


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 24px auto; max-width: 1200px; color: #222;
       padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 2px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
h3 { margin-top: 1.4em; } h4 { margin: 1em 0 .3em; color: #444; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 8px; font-size: 12px; overflow-x: auto; }
figure { display: inline-block; margin: 6px 12px 12px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; }
.muted { color: #777; font-size: 12px; }
nav a { margin-right: 14px; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _esc(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return _esc(value)


def _img_tag(path: Path, caption: str) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f'<p class="muted">(could not read {_esc(path)})</p>'
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(text: str) -> str:
    """Minimal markdown: pipe tables, ``#`` headings, fenced code, paragraphs (everything escaped)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre>{_esc(chr(10).join(block))}</pre>")
            i += 1
            continue
        if stripped.startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            header = _split_row(stripped)
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i]))
                i += 1
            out.append(_table(header, rows))
            continue
        match = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if match:
            out.append(f"<h4>{_esc(match.group(2))}</h4>")
        elif stripped:
            out.append(f"<p>{_esc(stripped)}</p>")
        i += 1
    return "\n".join(out)


def _metrics_html(data: dict[str, Any]) -> str:
    scalars = [(k, v) for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None]
    parts = [_table(["metric", "value"], scalars)] if scalars else []
    per_class = data.get("per_class")
    if isinstance(per_class, dict) and per_class and all(isinstance(v, dict) for v in per_class.values()):
        cols = list(dict.fromkeys(k for v in per_class.values() for k in v))
        parts.append(_table(["class", *cols], [[name, *(row.get(c, "") for c in cols)]
                                               for name, row in per_class.items()]))
    for key, value in data.items():
        if key == "per_class" or not isinstance(value, dict):
            continue
        flat = [(k, v) for k, v in value.items() if isinstance(v, (int, float, str, bool))]
        if flat:
            parts.append(f"<h4>{_esc(key)}</h4>" + _table(["name", "value"], flat))
    return "\n".join(parts)


def _history_html(history: pd.DataFrame) -> str:
    if history.empty:
        return ""
    parts = [f'<p class="muted">{len(history)} epochs; last epoch:</p>']
    parts.append(_table(["column", "value"], [(c, history[c].iloc[-1]) for c in history.columns]))
    for col, better in (("val_balanced_accuracy", "max"), ("val_loss", "min")):
        if col in history.columns and history[col].notna().any():
            idx = history[col].idxmax() if better == "max" else history[col].idxmin()
            epoch = history.loc[idx, "epoch"] if "epoch" in history.columns else idx + 1
            parts.append(f'<p class="muted">best {_esc(col)}: {history.loc[idx, col]:.4f} (epoch {_esc(epoch)})</p>')
            break
    return "\n".join(parts)


def _run_section(art: RunArtifacts, anchor: str, title_level: int = 2) -> str:
    h = f"h{title_level}"
    rel = lambda p: str(p.relative_to(art.root))  # noqa: E731
    parts = [f'<{h} id="{anchor}">{_esc(art.name)}</{h}>', f'<p class="muted">{_esc(art.root)}</p>']
    if art.config_text:
        parts.append("<h3>config</h3>")
        parts.append(f"<pre>{_esc(art.config_text)}</pre>")
    if art.metrics:
        parts.append("<h3>metrics</h3>")
        for path, data in art.metrics:
            parts.append(f"<h4>{_esc(rel(path))}</h4>")
            parts.append(_metrics_html(data))
    if art.history is not None:
        parts.append("<h3>training history</h3>")
        parts.append(_history_html(art.history))
    if art.markdown:
        parts.append("<h3>tables</h3>")
        for path, text in art.markdown:
            parts.append(f"<h4>{_esc(rel(path))}</h4>")
            parts.append(markdown_to_html(text))
    if art.images:
        current = None
        parts.append("<h3>figures</h3>")
        for kind, path in art.images:
            if kind != current:
                parts.append(f"<h4>{_esc(kind)}</h4>")
                current = kind
            parts.append(_img_tag(path, rel(path)))
    return "\n".join(parts)


def _config_value(cfg: dict[str, Any] | None, dotted: str) -> Any:
    cur: Any = cfg
    for key in dotted.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return ""
        cur = cur[key]
    return cur


def _comparison_table(runs: Sequence[RunArtifacts]) -> str:
    cfg_cols = [
        ("backbone", ("model.backbone", "backbone", "model.name")),
        ("img size", ("data.img_size", "img_size")),
        ("label fraction", ("data.label_fraction",)),
        ("epochs", ("train.epochs", "epochs")),
        ("seed", ("seed",)),
    ]
    rows = []
    for i, art in enumerate(runs):
        cfg_vals = []
        for _, keys in cfg_cols:
            value = next((v for k in keys if (v := _config_value(art.config, k)) != ""), "")
            cfg_vals.append(value)
        m = art.latest_metrics() or {}
        link = f'<a href="#run{i}">{_esc(art.name)}</a>'
        rows.append([link, *cfg_vals, *(m.get(k, "") for k in HEADLINE)])
    header = ["run", *(c for c, _ in cfg_cols), *HEADLINE]
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + f"<td>{row[0]}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in row[1:]) + "</tr>" for row in rows
    )
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        '<p class="muted">metrics: the most recent metrics.json of each run</p>'
    )


def render_report(runs: Sequence[RunArtifacts], title: str | None = None) -> str:
    """The HTML text of the report of ``runs`` (a comparison page when there are several)."""
    if not runs:
        raise LeukolabError("no run folders given")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if len(runs) == 1:
        title = title or f"leukolab report: {runs[0].name}"
        body = _run_section(runs[0], "run0")
    else:
        title = title or f"leukolab comparison of {len(runs)} runs"
        nav = "".join(f'<a href="#run{i}">{_esc(a.name)}</a>' for i, a in enumerate(runs))
        body = "\n".join(
            ["<h2>summary</h2>", _comparison_table(runs), f"<nav>{nav}</nav>"]
            + [_run_section(a, f"run{i}") for i, a in enumerate(runs)]
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_esc(title)}</h1><p class="muted">generated {stamp} by leukolab</p>\n{body}\n</body></html>\n'
    )


def write_report(
    run_dirs: Sequence[Path | str], out: Path | str, max_depth: int = 3, max_images: int = 40,
    title: str | None = None,
) -> Path:
    """Collect every run folder and write the HTML page to ``out`` (a new file)."""
    out = Path(out)
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    if out.suffix.lower() not in (".html", ".htm"):
        raise LeukolabError(f"--out {out}: expected an .html file")
    runs = [collect_run(d, max_depth=max_depth, max_images=max_images) for d in run_dirs]
    text = render_report(runs, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if out.exists():
            raise LeukolabError(f"{out} already exists; refusing to overwrite it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
