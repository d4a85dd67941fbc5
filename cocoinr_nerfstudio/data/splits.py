"""Few-view splits of the CoCo-INR paper and the rules that turn them into train/eval views.

The paper's tables (``splits/*.toml``, package data) contain invalid entries (indices past the
last image, repeats, lists shorter or longer than their view count). They are kept verbatim and
cleaned here, at selection time, so every problem is reported once instead of crashing or
silently training on something else. No nerfstudio import: cheap to load and to test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np

DATASET_NAMES: dict[str, str] = {"dtu": "DTU", "bmvs": "BlendedMVS", "h3ds": "H3DS"}
"""Datasets with a paper split table, keyed by the name used in ``--dataset`` and in file names."""

H3DS_SCENE_ID = re.compile(r"^[0-9a-f]{16}$")
"""H3DS names scenes by a 16-digit hex hash."""
_TABLE_ID = re.compile(rf"^(scan\d+|{H3DS_SCENE_ID.pattern[1:-1]})$")

NumViews = int | str


@dataclass(frozen=True)
class ScanSplits:
    """One scan's row of a paper table, exactly as published."""

    dataset: str
    scan_id: str
    num_images: int
    train_views: Mapping[int, tuple[int, ...]]
    tags: tuple[str, ...] = ()


@dataclass
class ViewSplit:
    """Chosen views (positions in the full image list) and how they were chosen."""

    train: list[int]
    eval: list[int]
    method: str
    """"all", "paper", "even" or "explicit" (``--train-views``)."""
    notes: list[str] = field(default_factory=list)
    """Problems found in the paper table entry; the caller reports them in one warning."""


@cache
def load_split_table(dataset: str) -> dict[str, ScanSplits]:
    """The paper table of ``dataset`` ("dtu", "bmvs" or "h3ds"), keyed by scan id."""
    if dataset not in DATASET_NAMES:
        raise ValueError(f"No split table for dataset '{dataset}'; tables exist for {sorted(DATASET_NAMES)}.")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    raw = tomllib.loads((resources.files(__package__) / "splits" / f"{dataset}.toml").read_text("utf-8"))
    return {
        scan_id: ScanSplits(
            dataset=dataset,
            scan_id=scan_id,
            num_images=int(row["num_images"]),
            train_views={int(k): tuple(int(i) for i in v) for k, v in row["train_views"].items()},
            tags=tuple(row.get("tags", ())),
        )
        for scan_id, row in raw["scans"].items()
    }


def known_scans(dataset: str) -> list[str]:
    """Scan ids of ``dataset``'s table, in table order."""
    return list(load_split_table(dataset))


def looks_like_table_id(scan_id: str | None) -> bool:
    """True for ids shaped like the tables' (``scan65``, a 16-hex H3DS hash): such a scan is
    meant to use a paper split, so an unknown one is an error rather than a silent fallback."""
    return scan_id is not None and _TABLE_ID.match(scan_id) is not None


def datasets_with_scan(scan_id: str | None) -> list[str]:
    """Datasets whose table lists ``scan_id``."""
    return [ds for ds in DATASET_NAMES if scan_id is not None and scan_id in load_split_table(ds)]


def find_scan(scan_id: str | None, dataset: str | None = None) -> ScanSplits | None:
    """The table row of ``scan_id`` in ``dataset`` (or in the only table listing it), else None."""
    if dataset is not None and dataset not in DATASET_NAMES:
        return None
    candidates = [dataset] if dataset is not None else datasets_with_scan(scan_id)
    rows = [load_split_table(ds).get(scan_id) for ds in candidates]  # type: ignore[arg-type]
    rows = [r for r in rows if r is not None]
    return rows[0] if len(rows) == 1 else None


def parse_num_views(num_views: NumViews) -> int | None:
    """``"all"`` -> None, else a positive int (accepts ``8`` or ``"8"``)."""
    if isinstance(num_views, str) and num_views.strip().lower() == "all":
        return None
    try:
        n = int(num_views)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(num_views).strip() != str(n):
        raise ValueError(f"--num-views must be a positive integer or 'all', got {num_views!r}.")
    return n


def paper_train_views(scan: ScanSplits, num_views: int, num_images: int) -> tuple[list[int], list[str]]:
    """Valid, sorted training views of the table entry, and notes on everything that was dropped."""
    if num_views not in scan.train_views:
        raise ValueError(
            f"{DATASET_NAMES[scan.dataset]} {scan.scan_id} has paper splits for "
            f"{', '.join(map(str, sorted(scan.train_views)))} views, not --num-views {num_views}; "
            "use --split even (or --train-views) for other counts."
        )
    raw = scan.train_views[num_views]
    seen: set = set()
    out_of_range, repeated = [], []
    for i in raw:
        if not 0 <= i < num_images:
            out_of_range.append(i)
        elif i in seen:
            repeated.append(i)
        else:
            seen.add(i)
    train = sorted(seen)
    notes = []
    if scan.num_images != num_images:
        notes.append(f"the table is for {scan.num_images} images but the scene has {num_images}")
    if out_of_range:
        notes.append(f"dropped out-of-range indices {out_of_range} (valid: 0..{num_images - 1})")
    if repeated:
        notes.append(f"dropped repeated indices {repeated}")
    if len(raw) != num_views:
        notes.append(f"the table lists {len(raw)} entries for {num_views} views")
    if len(train) != num_views:
        notes.append(f"training on the {len(train)} valid views as they are")
    if not train:
        raise ValueError(
            f"The paper split of {DATASET_NAMES[scan.dataset]} {scan.scan_id} for {num_views} views has no valid "
            f"index for a scene of {num_images} images ({'; '.join(notes)})."
        )
    return train, notes


def even_train_views(num_views: int, num_images: int) -> list[int]:
    """``num_views`` views spread evenly over the image list (first and last included)."""
    if num_views > num_images:
        raise ValueError(f"--num-views {num_views} is more than the {num_images} images of the scene.")
    return sorted(set(np.round(np.linspace(0, num_images - 1, num_views)).astype(int).tolist()))


def explicit_train_views(views: Sequence[int], num_images: int) -> list[int]:
    """``--train-views`` as given; unlike table entries, a wrong index here is the user's error."""
    views = [int(v) for v in views]
    bad = [v for v in views if not 0 <= v < num_images]
    if bad:
        raise ValueError(f"--train-views {bad} out of range: the scene has {num_images} images (0..{num_images - 1}).")
    repeated = sorted({v for v in views if views.count(v) > 1})
    if repeated:
        raise ValueError(f"--train-views repeats {repeated}; give each view once.")
    if not views:
        raise ValueError("--train-views is empty; give at least one view index.")
    return sorted(views)


def eval_views(train: Sequence[int], num_images: int, eval_stride: int = 1) -> list[int]:
    """Every view not used for training (all views if all train), keeping every ``eval_stride``-th."""
    if eval_stride < 1:
        raise ValueError(f"--eval-stride must be >= 1, got {eval_stride}.")
    held_out = sorted(set(range(num_images)) - set(train)) or list(range(num_images))
    return held_out[::eval_stride]


def _unknown_scan_error(scan_id: str | None, dataset: str | None) -> ValueError:
    if scan_id is None:
        return ValueError("--split paper needs a scan id: pass --scan-id or name the folder like the table (scan65).")
    shaped = ["h3ds"] if H3DS_SCENE_ID.match(scan_id) else ["dtu", "bmvs"]
    candidates = [dataset] if dataset in DATASET_NAMES else (datasets_with_scan(scan_id) or shaped)
    listing = "; ".join(f"{DATASET_NAMES[ds]}: {', '.join(known_scans(ds))}" for ds in candidates)
    where = DATASET_NAMES.get(dataset or "", "any paper table")
    return ValueError(
        f"Scan '{scan_id}' is not in {where} (or is ambiguous), so it has no paper split. Known scans - {listing}. "
        "Pass --scan-id/--dataset, or use --split even, --train-views or --num-views all."
    )


def select_views(
    num_images: int,
    num_views: NumViews = "all",
    split: str = "auto",
    scan_id: str | None = None,
    dataset: str | None = None,
    train_views: Sequence[int] | None = None,
    eval_stride: int = 1,
) -> ViewSplit:
    """Train/eval views following ``--train-views`` > ``--num-views all`` > ``--split``.

    ``split="auto"`` uses the paper table when the scan is in it or its id looks like a table id,
    else even spacing. ``dataset`` None means unknown (any table may be searched); "custom" has no table.
    """
    if split not in ("auto", "paper", "even"):
        raise ValueError(f"--split must be auto, paper or even, got {split!r}.")
    n = parse_num_views(num_views)
    notes: list[str] = []
    if train_views is not None:
        train, method = explicit_train_views(train_views, num_images), "explicit"
    elif n is None:
        train, method = list(range(num_images)), "all"
    else:
        method = split
        if method == "auto":
            in_table = dataset != "custom" and (find_scan(scan_id, dataset) is not None or looks_like_table_id(scan_id))
            method = "paper" if in_table else "even"
        if method == "paper":
            if dataset == "custom":
                raise ValueError(
                    "--dataset custom has no paper split: use --split even, --train-views or --num-views all."
                )
            scan = find_scan(scan_id, dataset)
            if scan is None:
                raise _unknown_scan_error(scan_id, dataset)
            train, notes = paper_train_views(scan, n, num_images)
        else:
            train = even_train_views(n, num_images)
    return ViewSplit(train=train, eval=eval_views(train, num_images, eval_stride), method=method, notes=notes)
