"""The data-tool recipes: find duplicate images (``leukolab dedup``) and write cross-validation folds
(``leukolab split``).

Inputs are read as :func:`read_image_set` describes: a folder of class folders, a folder with
``train/``/``val/``/``test/`` split folders, a ``path,label`` (or ``path,labels``) CSV, or a plain folder of
unlabelled images. The hashing and clustering live in :mod:`leukolab.data.dedup`, the fold assignment in
:mod:`leukolab.data.folds`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from leukolab.data.dedup import (
    DEFAULT_THRESHOLD,
    HASH_BITS,
    ImageHashes,
    cluster_pairs,
    compute_hashes,
    dihedral_distance,
    near_pairs,
)
from leukolab.data.folds import multilabel_folds, parse_label_set, stratified_folds
from leukolab.data.readers import RESERVED_DIRS, is_image_file, read_image_table, read_labelled
from leukolab.errors import LeukolabError
from leukolab.utils.files import write_text

__all__ = ["DedupReport", "ImageSet", "SplitOptions", "SplitResult", "dedup", "read_image_set", "split_folds"]

#: columns of the clusters CSV written by :func:`dedup`
CLUSTER_COLUMNS = ("cluster", "set", "split", "path", "label", "kind", "distance", "phash")


@dataclass
class ImageSet:
    """Images with their labels (``""`` when unlabelled) and split names (``""`` when unsplit)."""

    paths: list[Path]
    labels: list[str]
    splits: list[str]
    table: pd.DataFrame | None = None  # the CSV rows, when read from a CSV (same order as ``paths``)

    def __len__(self) -> int:
        return len(self.paths)


def read_image_set(path: Path | str) -> ImageSet:
    """Read any image collection leukolab knows, labelled or not.

    * a CSV with a ``path`` column (relative to the CSV's folder) and optionally ``label`` or ``labels``
      (``;``-separated) and ``split``;
    * a folder of class folders, or a folder with ``train/``, ``val/``, ``test/`` class-folder trees;
    * any other folder: every image below it, unlabelled (``masks/`` folders skipped).
    """
    path = Path(path)
    if not path.exists():
        raise LeukolabError(f"{path} does not exist; expected an image folder or a CSV with a path column")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise LeukolabError(f"{path}: expected a folder of images or a .csv file")
        df = read_image_table(path, ("path",))
        label_col = "label" if "label" in df.columns else "labels" if "labels" in df.columns else None
        labels = [] if label_col is None else ["" if pd.isna(v) else str(v) for v in df[label_col]]
        splits = [str(s) for s in df["split"]] if "split" in df.columns else [""] * len(df)
        return ImageSet([Path(p) for p in df["path"]], labels or [""] * len(df), splits, df.reset_index(drop=True))
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in RESERVED_DIRS]
    if subdirs:
        paths, labels, splits = [], [], []
        for split, data in read_labelled(path, min_classes=1).items():
            paths += data.paths
            labels += data.labels
            splits += ["" if split == "all" else split] * len(data)
        return ImageSet(paths, labels, splits)
    images = sorted(p for p in path.rglob("*") if is_image_file(p) and not RESERVED_DIRS & set(p.parts))
    if not images:
        raise LeukolabError(f"{path}: folder holds no images")
    return ImageSet(images, [""] * len(images), [""] * len(images))


# ----------------------------------------------------------------------------------------------- dedup


@dataclass
class DedupReport:
    """What :func:`dedup` found.

    Attributes:
        out: the clusters CSV written.
        n_data / n_other: images in DATA and OTHER (0 without ``--across``).
        threshold: near-duplicate threshold in bits (of :data:`HASH_BITS`).
        exact_groups / exact_images: groups of byte-identical files inside DATA, and the images in them.
        near_clusters / near_images: clusters inside DATA that hold more than byte-identical copies, and their
            images.
        clusters / cluster_images: rows of the CSV (DATA and OTHER together).
        leaked / leaked_exact: images of DATA with a (near-)duplicate in OTHER, and those with an identical file.
        seconds: wall time (hashing + comparison).
    """

    out: Path
    n_data: int
    n_other: int
    threshold: int
    exact_groups: int
    exact_images: int
    near_clusters: int
    near_images: int
    clusters: int
    cluster_images: int
    leaked: int = 0
    leaked_exact: int = 0
    seconds: float = 0.0
    other: Path | None = None
    data: Path | None = None

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        out = [
            f"{self.data}: {self.n_data} images",
            f"  exact duplicates (identical files): {self.exact_groups} groups, {self.exact_images} images "
            f"({self.exact_images - self.exact_groups} redundant copies)",
            f"  near duplicates (<= {self.threshold} of {HASH_BITS} bits, any flip or 90-degree rotation): "
            f"{self.near_clusters} clusters, {self.near_images} images",
        ]
        if self.other is not None:
            out.append(f"{self.other}: {self.n_other} images")
            out.append(f"  images of DATA with a (near-)duplicate in OTHER (leakage): {self.leaked} of {self.n_data} "
                       f"({self.leaked_exact} identical files)")
        out.append(f"wrote {self.out}: {self.clusters} clusters, {self.cluster_images} images "
                   f"({self.seconds:.1f} s)")
        return out


def _new_file(name: str) -> Path:
    """``name`` in the current folder, or ``stem-2.csv``, ``-3`` ... if taken."""
    base = Path(name)
    for k in range(1, 10000):
        candidate = base if k == 1 else base.with_name(f"{base.stem}-{k}{base.suffix}")
        if not candidate.exists():
            return candidate
    raise LeukolabError(f"could not find a free file name like {name} in {Path.cwd()}")


def dedup(data: Path | str, other: Path | str | None = None, threshold: int = DEFAULT_THRESHOLD,
          out: Path | str | None = None, progress: bool = True) -> DedupReport:
    """Find exact and near-duplicate images in ``data`` (and those shared with ``other``); write a clusters CSV.

    The CSV (a new file: ``out``, or ``dedup.csv`` / ``dedup-2.csv`` ... in the current folder) has one row per
    image in a cluster of duplicates, with the columns of :data:`CLUSTER_COLUMNS`: ``set`` is ``data`` or
    ``other``, ``kind`` is ``exact`` when another member has identical bytes and ``near`` otherwise, and
    ``distance`` is the hash distance in bits to the cluster's first member.
    """
    if out is not None and Path(out).exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    if not 0 <= threshold <= HASH_BITS:
        raise LeukolabError(f"--threshold {threshold} is outside [0, {HASH_BITS}] bits")
    start = time.perf_counter()
    a = read_image_set(data)
    b = read_image_set(other) if other is not None else None
    if b is not None:
        shared = {p.resolve() for p in a.paths} & {p.resolve() for p in b.paths}
        if shared:
            raise LeukolabError(f"{other}: {len(shared)} of its images are also in {data}; expected a separate set")
    paths = a.paths + (b.paths if b is not None else [])
    hashes = compute_hashes(paths, show_progress=progress)
    i, j, _ = near_pairs(hashes.bits, threshold)
    n = len(a)

    inside = j < n
    exact_groups = [g for g in Counter(hashes.digests[:n]).values() if g > 1]
    near = [c for c in cluster_pairs(n, i[inside], j[inside]) if len({hashes.digests[m] for m in c}) > 1]
    leaked = sorted({int(x) for x in i[(i < n) & (j >= n)]})
    other_digests = set(hashes.digests[n:])
    clusters = cluster_pairs(len(paths), i, j)
    table = _cluster_table(clusters, hashes, a, b)
    target = Path(out) if out is not None else _new_file("dedup.csv")
    write_text(target, table.to_csv(index=False))
    return DedupReport(
        out=target, n_data=n, n_other=len(paths) - n, threshold=threshold,
        exact_groups=len(exact_groups), exact_images=sum(exact_groups),
        near_clusters=len(near), near_images=sum(len(c) for c in near),
        clusters=len(clusters), cluster_images=sum(len(c) for c in clusters),
        leaked=len(leaked), leaked_exact=sum(hashes.digests[x] in other_digests for x in leaked),
        seconds=time.perf_counter() - start, other=Path(other) if other is not None else None, data=Path(data),
    )


def _cluster_table(clusters: list[list[int]], hashes: ImageHashes, a: ImageSet, b: ImageSet | None) -> pd.DataFrame:
    n = len(a)
    rows = []
    for cid, members in enumerate(clusters):
        digests = Counter(hashes.digests[m] for m in members)
        first = members[0]
        for m in members:
            src, k = (a, m) if m < n else (b, m - n)
            assert src is not None
            rows.append({
                "cluster": cid, "set": "data" if m < n else "other", "split": src.splits[k], "path": str(src.paths[k]),
                "label": src.labels[k], "kind": "exact" if digests[hashes.digests[m]] > 1 else "near",
                "distance": 0 if m == first else dihedral_distance(hashes.bits[first], hashes.bits[m]),
                "phash": hashes.hex(m),
            })
    return pd.DataFrame(rows, columns=list(CLUSTER_COLUMNS))


# ----------------------------------------------------------------------------------------------- split


@dataclass
class SplitOptions:
    """How :func:`split_folds` assigns folds.

    Attributes:
        folds: number of folds K (>= 2).
        seed: random seed; the same seed gives the same folds.
        multilabel: DATA is a CSV with a ``labels`` column of ``;``-separated labels (iterative stratification).
        group_by: a CSV column whose images stay together, or ``duplicates`` (clusters of near-duplicate images).
        dedup_threshold: near-duplicate threshold in bits for ``group_by="duplicates"``.
        progress: progress bar while hashing.
    """

    folds: int = 5
    seed: int = 0
    multilabel: bool = False
    group_by: str | None = None
    dedup_threshold: int = DEFAULT_THRESHOLD
    progress: bool = True


@dataclass
class SplitResult:
    """The folds table written and a per-fold summary."""

    out: Path
    table: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def split_folds(data: Path | str, out: Path | str, options: SplitOptions | None = None) -> SplitResult:
    """Write a folds CSV (``path``, ``label`` or ``labels``, ``fold``[, ``group``]) for ``data``.

    A folder with split folders (or a CSV with a ``split`` column) is folded over its ``train`` split only; the
    other splits stay held out. Paths are written absolute.
    """
    o = options or SplitOptions()
    out = Path(out)
    if out.exists():
        raise LeukolabError(f"{out} already exists; refusing to overwrite it")
    if o.folds < 2:
        raise LeukolabError(f"--folds {o.folds}: expected at least 2")
    images = read_image_set(data)
    notes = []
    if any(images.splits):
        keep = [k for k, s in enumerate(images.splits) if s == "train"]
        if not keep:
            raise LeukolabError(f"{data}: has splits but no 'train' split to fold")
        notes.append(f"{data} has splits; folding its train split ({len(keep)} of {len(images)} images)")
        images = _subset(images, keep)
    if len(images) == 0:
        raise LeukolabError(f"{data}: no images to split")
    label_sets = _label_sets(images, data, o.multilabel)
    groups = _groups(images, data, o, notes)

    if o.multilabel:
        folds = multilabel_folds(label_sets, o.folds, o.seed, groups)
        label_col = {"labels": [";".join(s) for s in label_sets]}
    else:
        folds = stratified_folds(images.labels, o.folds, o.seed, groups)
        label_col = {"label": images.labels}
    table = pd.DataFrame({"path": [str(p.resolve()) for p in images.paths], **label_col, "fold": folds})
    if groups is not None:
        table["group"] = groups
    write_text(out, table.to_csv(index=False))
    return SplitResult(out, table, _fold_summary(table, label_sets, o.folds), notes)


def _subset(images: ImageSet, keep: list[int]) -> ImageSet:
    table = images.table.iloc[keep].reset_index(drop=True) if images.table is not None else None
    return ImageSet([images.paths[k] for k in keep], [images.labels[k] for k in keep],
                    [images.splits[k] for k in keep], table)


def _label_sets(images: ImageSet, data: Path | str, multilabel: bool) -> list[list[str]]:
    columns = set(images.table.columns) if images.table is not None else set()
    if multilabel:
        if "labels" not in columns:
            raise LeukolabError(f"{data}: --multilabel expects a CSV with a 'labels' column (labels separated by ';')")
        return [parse_label_set(v) for v in images.table["labels"]]  # type: ignore[index]
    if images.table is not None and "label" not in columns:
        hint = "; use --multilabel for a 'labels' column" if "labels" in columns else ""
        raise LeukolabError(f"{data}: missing column label; expected columns path,label{hint}")
    if not all(images.labels):
        raise LeukolabError(f"{data}: {sum(not x for x in images.labels)} image(s) have no label")
    return [[x] for x in images.labels]


def _groups(images: ImageSet, data: Path | str, o: SplitOptions, notes: list[str]) -> list[object] | None:
    if o.group_by is None:
        return None
    if o.group_by == "duplicates":
        hashes = compute_hashes(images.paths, show_progress=o.progress)
        i, j, _ = near_pairs(hashes.bits, o.dedup_threshold)
        group = np.arange(len(images)) + len(images)  # singletons: their own group
        clusters = cluster_pairs(len(images), i, j)
        for cid, members in enumerate(clusters):
            group[members] = cid
        _, group = np.unique(group, return_inverse=True)  # 0..n_groups-1, clusters first
        notes.append(f"{len(clusters)} clusters of duplicates ({sum(map(len, clusters))} images) kept in one fold "
                     f"each (threshold {o.dedup_threshold} of {HASH_BITS} bits)")
        return [int(g) for g in group]
    table = images.table
    if table is None:
        raise LeukolabError(f"{data}: --group-by {o.group_by} needs a CSV with that column "
                            "(or --group-by duplicates)")
    if o.group_by not in table.columns:
        raise LeukolabError(f"{data}: no column {o.group_by!r} to group by; columns are {', '.join(table.columns)}")
    values = table[o.group_by]
    if values.isna().any():
        raise LeukolabError(f"{data}: column {o.group_by!r} is empty in {int(values.isna().sum())} row(s)")
    return [str(v) for v in values]


def _fold_summary(table: pd.DataFrame, label_sets: list[list[str]], k: int) -> pd.DataFrame:
    """Images per fold and per class/label (``images``, then one row per label); ``groups`` when grouped."""
    rows: dict[str, dict[int, int]] = {"images": {f: int((table["fold"] == f).sum()) for f in range(k)}}
    if "group" in table.columns:
        rows["groups"] = {f: int(table.loc[table["fold"] == f, "group"].nunique()) for f in range(k)}
    for name in sorted({x for s in label_sets for x in s}):
        has = np.array([name in s for s in label_sets])
        rows[name] = {f: int((has & (table["fold"].to_numpy() == f)).sum()) for f in range(k)}
    summary = pd.DataFrame(rows).T
    summary.columns = [f"fold {f}" for f in range(k)]
    return summary
