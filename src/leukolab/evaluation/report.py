"""One self-contained HTML page per run, or a comparison page for several runs.

A run folder and its subfolders (a few levels deep; ``checkpoints/`` and hidden
folders are skipped) are read folder by folder. A folder with an artefact
manifest (``artefacts.json``, kept by :func:`leukolab.evaluation.manifest.record`
as the writers of :mod:`leukolab.evaluation` write) is rendered from it: each
listed config, metrics JSON, training history, table (from the CSV written),
figure and page under its recorded title. The files leukolab writes under fixed
names and that a manifest may not list (``config.yaml`` and ``history.csv`` are
written below the evaluation layer; older runs have no manifest at all) are
added by name: ``config.yaml``, ``metrics.json``, ``history.csv``, the probe and
label-efficiency results CSVs, and the folder's ``*.png`` figures. PNGs count as
figures only in the run folder itself and in folders that hold a manifest or
one of those files, so image data in subfolders stays out.

Images are embedded as base64, so the page can be mailed or archived as one
file. Nothing is fetched from the internet and no markdown is parsed.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from leukolab.errors import LeukolabError
from leukolab.evaluation.manifest import KINDS, MANIFEST, read_manifest, record
from leukolab.evaluation.tables import label_efficiency_summary, label_efficiency_table, percent_table
from leukolab.utils.files import write_text

__all__ = ["FolderArtifacts", "Item", "RunArtifacts", "collect_run", "render_report", "write_report"]

#: folders never searched
SKIP_DIRS = frozenset({"checkpoints", "__pycache__", "masks"})
#: headline metrics of the comparison table, in order
HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "n")
#: rows of a table shown on the page (the CSV holds them all)
MAX_TABLE_ROWS = 40
#: image types embedded, by suffix
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def _probe_summary(results: pd.DataFrame) -> pd.DataFrame:
    return percent_table(results).reset_index()


def _label_efficiency(results: pd.DataFrame) -> pd.DataFrame:
    return label_efficiency_table(label_efficiency_summary(results))


#: files leukolab writes under fixed names: name -> (kind, title, table derived from the CSV or None)
FIXED_FILES: dict[str, tuple[str, str, Callable[[pd.DataFrame], pd.DataFrame] | None]] = {
    "config.yaml": ("config", "config", None),
    "metrics.json": ("metrics", "metrics", None),
    "history.csv": ("history", "training history", None),
    "probe.csv": ("table", "probes: metrics in percent, mean (± std over folds)", _probe_summary),
    "label_efficiency.csv": ("table", "label efficiency: balanced accuracy / macro F1, mean ± std over seeds",
                             _label_efficiency),
}


@dataclass
class Item:
    """One artefact to show: absolute ``path``, ``kind`` (see :data:`~leukolab.evaluation.manifest.KINDS`),
    ``title``, whether a manifest ``listed`` it, and for some unlisted result CSVs the table ``derive``d
    from it (e.g. the probe summary from ``probe.csv``)."""

    path: Path
    kind: str
    title: str
    listed: bool = True
    derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None


@dataclass
class FolderArtifacts:
    """The artefacts of one folder of a run, in display order."""

    folder: Path
    items: list[Item]
    has_manifest: bool


@dataclass
class RunArtifacts:
    """What one run folder (and its subfolders) holds; paths are absolute."""

    root: Path
    folders: list[FolderArtifacts] = field(default_factory=list)
    max_images: int = 40

    @property
    def name(self) -> str:
        return self.root.name

    def items(self, kind: str | None = None) -> Iterator[Item]:
        """Every item, folder by folder (the run folder first), optionally of one kind."""
        for folder in self.folders:
            yield from (item for item in folder.items if kind is None or item.kind == kind)

    @property
    def images(self) -> list[Item]:
        """The figures embedded in the page (the first ``max_images``)."""
        return [i for i in self.items("figure") if i.path.suffix.lower() in IMAGE_TYPES][: self.max_images]

    @property
    def config(self) -> dict[str, Any] | None:
        """The run folder's own config (its ``config.yaml``, or the first config it lists)."""
        root = next((f for f in self.folders if f.folder == self.root), None)
        configs = [i for i in (root.items if root else []) if i.kind == "config"]
        configs.sort(key=lambda i: i.path.name != "config.yaml")
        for item in configs:
            try:
                loaded = yaml.safe_load(item.path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(loaded, dict):
                return loaded
        return None

    def latest_metrics(self) -> dict[str, Any] | None:
        """The most recently written metrics JSON of the run (e.g. its last ``evaluate``)."""
        found = []
        for item in self.items("metrics"):
            try:
                data = json.loads(item.path.read_text(encoding="utf-8"))
                found.append((item.path.stat().st_mtime, str(item.path), data))
            except (OSError, ValueError):
                continue
        found = [f for f in found if isinstance(f[2], dict)]
        return max(found, key=lambda f: (f[0], f[1]))[2] if found else None


# --------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------


def _folders(root: Path, max_depth: int) -> list[Path]:
    """``root`` and its subfolders down to ``max_depth`` levels, breadth first, by name."""
    out, level = [root], [root]
    for _ in range(max_depth):
        nxt = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            nxt += [e for e in entries if e.is_dir() and not e.name.startswith(".") and e.name not in SKIP_DIRS]
        out += nxt
        level = nxt
    return out


def _folder_artifacts(folder: Path, is_root: bool) -> FolderArtifacts | None:
    manifest = read_manifest(folder)
    items: list[Item] = []
    for entry in manifest or []:
        path = folder / entry.path
        if entry.kind in KINDS and path.is_file():
            items.append(Item(path, entry.kind, entry.title or entry.path))
    listed = {i.path for i in items}
    for name, (kind, title, derive) in FIXED_FILES.items():
        path = folder / name
        if path not in listed and path.is_file():
            items.append(Item(path, kind, title, listed=False, derive=derive))
    if not (is_root or manifest is not None or items):
        return None  # not an output folder (e.g. image data): its PNGs are not figures
    pngs = sorted(p for p in folder.glob("*.png") if p.is_file() and not p.name.startswith(".") and p not in listed)
    items += [Item(p, "figure", p.stem.replace("_", " "), listed=False) for p in pngs]
    items.sort(key=lambda i: KINDS.index(i.kind))  # stable: manifest order within a kind
    return FolderArtifacts(folder, items, manifest is not None) if items else None


def collect_run(root: Path | str, max_depth: int = 3, max_images: int = 40) -> RunArtifacts:
    """Gather the artefacts of a run folder and its subfolders (see the module docstring).

    Raises :class:`LeukolabError` when the folder is missing, holds nothing to
    report, or holds a malformed ``artefacts.json``.
    """
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise LeukolabError(f"{root} is not a folder; expected a leukolab run folder")
        raise LeukolabError(f"run folder {root} does not exist")
    art = RunArtifacts(root=root.resolve(), max_images=max_images)
    for folder in _folders(art.root, max_depth):
        found = _folder_artifacts(folder, folder == art.root)
        if found is not None:
            art.folders.append(found)
    if not art.folders:
        raise LeukolabError(
            f"{root}: nothing to report (no {MANIFEST}, config.yaml, metrics.json, history.csv or .png figures "
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
        return "" if pd.isna(value) else f"{value:.4f}"
    return _esc(value)


def _muted(text: str) -> str:
    return f'<p class="muted">{_esc(text)}</p>'


def _img_tag(path: Path, caption: str) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return _muted(f"(could not read {path})")
    mime = IMAGE_TYPES[path.suffix.lower()]
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _frame_html(frame: pd.DataFrame, source: str) -> str:
    shown = frame.head(MAX_TABLE_ROWS)
    rows = [[v.item() if hasattr(v, "item") else v for v in row] for row in shown.itertuples(index=False)]
    out = _table([str(c) for c in frame.columns], rows)
    if len(frame) > len(shown):
        out += _muted(f"first {len(shown)} of {len(frame)} rows; all in {source}")
    return out


def _metrics_html(data: Any) -> str:
    if not isinstance(data, dict):
        return f"<pre>{_esc(json.dumps(data, indent=2))}</pre>"
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
        return _muted("(no epochs recorded)")
    parts = [_muted(f"{len(history)} epochs; last epoch:")]
    parts.append(_table(["column", "value"], [(c, history[c].iloc[-1]) for c in history.columns]))
    for col, better in (("val_balanced_accuracy", "max"), ("val_loss", "min")):
        if col in history.columns and history[col].notna().any():
            idx = history[col].idxmax() if better == "max" else history[col].idxmin()
            epoch = history.loc[idx, "epoch"] if "epoch" in history.columns else idx + 1
            parts.append(_muted(f"best {col}: {history.loc[idx, col]:.4f} (epoch {epoch})"))
            break
    return "\n".join(parts)


def _item_html(item: Item, rel: str) -> str:
    """The body of a non-figure item; a file that cannot be read gives a one-line note, not a failure."""
    try:
        if item.kind == "config":
            return f"<pre>{_esc(item.path.read_text(encoding='utf-8', errors='replace'))}</pre>"
        if item.kind == "metrics":
            return _metrics_html(json.loads(item.path.read_text(encoding="utf-8")))
        if item.kind == "history":
            return _history_html(pd.read_csv(item.path))
        if item.kind == "table":
            frame = pd.read_csv(item.path)
            return _frame_html(item.derive(frame) if item.derive else frame, rel)
    except Exception as exc:  # a damaged artefact must not cost the whole page
        return _muted(f"(could not read {rel}: {exc.__class__.__name__}: {exc})")
    return _muted(f"page: {rel}")  # html


def _run_section(art: RunArtifacts, anchor: str, title_level: int = 2) -> str:
    h = f"h{title_level}"
    parts = [f'<{h} id="{anchor}">{_esc(art.name)}</{h}>', _muted(str(art.root))]
    shown = {id(i) for i in art.images}
    n_figures = sum(1 for i in art.items("figure") if i.path.suffix.lower() in IMAGE_TYPES)
    for folder in art.folders:
        rel_folder = folder.folder.relative_to(art.root).as_posix()
        parts.append(f"<h3>{_esc(rel_folder if rel_folder != '.' else 'run folder')}</h3>")
        for item in folder.items:
            rel = item.path.relative_to(art.root).as_posix()
            if item.kind == "figure":
                if id(item) in shown:
                    parts.append(_img_tag(item.path, f"{item.title} ({rel})"))
                elif item.path.suffix.lower() not in IMAGE_TYPES:
                    parts.append(_muted(f"figure: {item.title} ({rel}, not embedded)"))
                continue
            parts.append(f"<h4>{_esc(item.title)} <span class=\"muted\">{_esc(rel)}</span></h4>")
            parts.append(_item_html(item, rel))
    if n_figures > len(shown):
        parts.append(_muted(f"{n_figures - len(shown)} more figures not shown (--max-images {art.max_images})"))
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
        config = art.config
        cfg_vals = [next((v for k in keys if (v := _config_value(config, k)) != ""), "") for _, keys in cfg_cols]
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
        + _muted("metrics: the most recent metrics file of each run")
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
        f"<h1>{_esc(title)}</h1>{_muted(f'generated {stamp} by leukolab')}\n{body}\n</body></html>\n"
    )


def write_report(
    run_dirs: Sequence[Path | str], out: Path | str, max_depth: int = 3, max_images: int = 40,
    title: str | None = None,
) -> Path:
    """Collect every run folder and write the HTML page to ``out`` (a new file, atomically).

    When ``out`` goes into one of the run folders, or into a folder that already
    has a manifest, the page is listed there (kind ``html``); a comparison page
    written elsewhere (e.g. the working folder) leaves no manifest behind.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise LeukolabError(f"--out {out}: expected an .html file")
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    runs = [collect_run(d, max_depth=max_depth, max_images=max_images) for d in run_dirs]
    text = render_report(runs, title)
    write_text(out, text)
    folder = out.parent.resolve()
    if folder in {r.root for r in runs} or (folder / MANIFEST).is_file():
        record(folder, out.name, "html", title or ("report" if len(runs) == 1 else "comparison"))
    return out
