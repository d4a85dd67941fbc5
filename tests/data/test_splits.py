"""Paper split tables and view selection (pure python: no scene needed)."""

from __future__ import annotations

import re

import pytest

from cocoinr_nerfstudio.data import splits
from cocoinr_nerfstudio.data.splits import ScanSplits, select_views

DTU_SCANS = [24, 37, 40, 55, 63, 65, 69, 83, 97, 105, 106, 110, 114, 118, 122]


def test_tables_carry_the_published_facts_verbatim():
    assert splits.known_scans("dtu") == [f"scan{i}" for i in DTU_SCANS]
    assert splits.known_scans("bmvs") == [f"scan{i}" for i in range(1, 10)]
    h3ds = splits.known_scans("h3ds")
    assert len(h3ds) == 23 and all(re.fullmatch(r"[0-9a-f]{16}", s) for s in h3ds)
    dtu = splits.load_split_table("dtu")
    assert {dtu[s].num_images for s in dtu} == {49, 64}
    assert dtu["scan24"].train_views[4] == (18, 24, 58, 65)  # invalid entries kept as published
    assert len(dtu["scan24"].train_views[8]) == 7 and len(dtu["scan24"].train_views[32]) == 25
    assert splits.load_split_table("bmvs")["scan9"].train_views.keys() == {3, 4, 8, 16, 32, 64}
    assert splits.load_split_table("h3ds")["1b2a8613401e42a8"].tags == ("h3d-net", "train_known")
    eef = splits.load_split_table("h3ds")["eef826f0c1f6deb0"].train_views[32]
    assert len(eef) == 32 and len(set(eef)) < 32


def test_scan65_three_views_and_disjoint_eval():
    chosen = select_views(49, num_views=3, scan_id="scan65")
    assert chosen.method == "paper" and chosen.train == [8, 24, 40] and chosen.notes == []
    assert set(chosen.train).isdisjoint(chosen.eval) and sorted(chosen.train + chosen.eval) == list(range(49))
    assert select_views(49, num_views="3", scan_id="scan65", split="paper").train == [8, 24, 40]
    assert select_views(49, num_views=3, scan_id="scan65", eval_stride=5).eval == chosen.eval[::5]


@pytest.mark.parametrize(
    ("dataset", "scan", "num_images", "n", "train", "note_bits"),
    [
        ("dtu", "scan24", 49, 4, [18, 24], ["out-of-range indices [58, 65]", "2 valid views"]),
        ("dtu", "scan24", 49, 8, [0, 8, 16, 24, 32, 40, 48], ["lists 7 entries for 8 views"]),
        ("dtu", "scan37", 49, 16, [0, 3, 4, 7, 14, 18, 20, 24, 29, 34, 41], ["[50, 54, 58, 62, 65]"]),
        ("dtu", "scan24", 49, 32, list(range(0, 49, 2)), ["lists 25 entries for 32 views"]),
        ("dtu", "scan83", 64, 16, [0, 3, 4, 7, 14, 18, 20, 24, 29, 34, 41, 50, 54, 58, 62], ["[65]"]),
        ("dtu", "scan69", 49, 3, [30, 35, 43], []),  # unsorted in the table
        ("bmvs", "scan3", 36, 32, list(range(0, 36, 2)), ["[36]", "lists 19 entries for 32 views"]),
        ("bmvs", "scan7", 31, 8, [0, 8, 16, 24], ["lists 4 entries for 8 views"]),
        ("bmvs", "scan9", 144, 64, list(range(0, 144, 2)), ["lists 72 entries for 64 views"]),
        ("bmvs", "scan2", 74, 3, [8, 32, 64], []),
        ("h3ds", "1b2a8613401e42a8", 66, 3, [0, 18, 65], []),
        ("h3ds", "eef826f0c1f6deb0", 69, 32, None, ["repeated indices"]),
    ],
)
def test_paper_splits_clean_invalid_entries(dataset, scan, num_images, n, train, note_bits):
    chosen = select_views(num_images, num_views=n, scan_id=scan)
    raw = splits.find_scan(scan).train_views[n]
    assert chosen.method == "paper" and splits.find_scan(scan).dataset == dataset
    assert chosen.train == (train if train is not None else sorted({i for i in raw if i < num_images}))
    assert len(set(chosen.train)) == len(chosen.train) and all(0 <= i < num_images for i in chosen.train)
    for bit in note_bits:
        assert any(bit in note for note in chosen.notes), (bit, chosen.notes)
    assert bool(chosen.notes) == bool(note_bits)


def test_table_for_other_image_count_is_noted():
    chosen = select_views(8, num_views=3, scan_id="1b2a8613401e42a8")
    assert chosen.train == [0]
    assert any("table is for 66 images but the scene has 8" in n for n in chosen.notes)
    assert any("[18, 65]" in n for n in chosen.notes)


def test_entry_without_any_valid_index_is_an_error():
    scan = ScanSplits("dtu", "scanX", 49, {3: (60, 61, 62)})
    with pytest.raises(ValueError, match="no valid index"):
        splits.paper_train_views(scan, 3, 49)


@pytest.mark.parametrize(
    ("scan_id", "dataset", "listed", "not_listed"),
    [
        ("scan999", None, ["scan24", "scan122", "scan1,", "scan9"], ["1b2a8613401e42a8"]),
        ("scan999", "dtu", ["scan24", "scan122"], ["BlendedMVS"]),
        ("0123456789abcdef", None, ["1b2a8613401e42a8"], ["scan24"]),
    ],
)
def test_unknown_table_like_scan_lists_known_scans(scan_id, dataset, listed, not_listed):
    with pytest.raises(ValueError, match=f"'{scan_id}'") as err:
        select_views(49, num_views=3, scan_id=scan_id, dataset=dataset)
    for name in listed:
        assert name in str(err.value)
    for name in not_listed:
        assert name not in str(err.value)
    assert select_views(49, num_views="all", scan_id=scan_id).method == "all"


def test_view_count_missing_from_table_and_paper_without_table():
    with pytest.raises(ValueError, match=r"3, 4, 8, 16, 32 views, not --num-views 5"):
        select_views(49, num_views=5, scan_id="scan65")
    with pytest.raises(ValueError, match="custom has no paper split"):
        select_views(49, num_views=3, scan_id="scan65", dataset="custom", split="paper")
    with pytest.raises(ValueError, match="needs a scan id"):
        select_views(49, num_views=3, split="paper")


def test_auto_falls_back_to_even_for_new_data():
    chosen = select_views(49, num_views=3, scan_id="my_object")
    assert chosen.method == "even" and chosen.train == [0, 24, 48] and chosen.notes == []
    assert select_views(49, num_views=3, scan_id="scan65", dataset="custom").method == "even"
    assert select_views(49, num_views=3, scan_id="scan65", split="even").train == [0, 24, 48]


def test_even_spacing():
    assert splits.even_train_views(5, 10) == [0, 2, 4, 7, 9]
    assert splits.even_train_views(1, 10) == [0]
    assert splits.even_train_views(10, 10) == list(range(10))
    with pytest.raises(ValueError, match="--num-views 11"):
        splits.even_train_views(11, 10)


def test_all_views_and_eval_stride():
    chosen = select_views(10, num_views="all", scan_id="scan65", eval_stride=3)
    assert chosen.method == "all" and chosen.train == list(range(10)) and chosen.eval == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="--eval-stride"):
        select_views(10, eval_stride=0)


def test_explicit_train_views_override_everything():
    chosen = select_views(49, num_views=3, scan_id="scan65", train_views=(40, 2, 9, 11))
    assert chosen.method == "explicit" and chosen.train == [2, 9, 11, 40] and chosen.notes == []
    with pytest.raises(ValueError, match=r"--train-views \[49, -1\] out of range"):
        select_views(49, train_views=(1, 49, -1))
    with pytest.raises(ValueError, match=r"--train-views repeats \[3\]"):
        select_views(49, train_views=(3, 4, 3))
    with pytest.raises(ValueError, match="--train-views is empty"):
        select_views(49, train_views=())


@pytest.mark.parametrize("bad", [0, -2, "x", "2.5", "", True])
def test_num_views_must_be_positive_or_all(bad):
    with pytest.raises(ValueError, match="--num-views"):
        select_views(49, num_views=bad)


def test_dataset_lookup_helpers():
    assert splits.datasets_with_scan("scan65") == ["dtu"]
    assert splits.datasets_with_scan("scan5") == ["bmvs"]
    assert splits.find_scan("scan65", "bmvs") is None and splits.find_scan("scan65", "custom") is None
    assert splits.looks_like_table_id("scan12") and splits.looks_like_table_id("0123456789abcdef")
    assert not splits.looks_like_table_id("scan_12") and not splits.looks_like_table_id(None)
    with pytest.raises(ValueError, match="No split table"):
        splits.load_split_table("llff")
