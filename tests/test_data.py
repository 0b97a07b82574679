"""Dataset sources, splits, HC18 outline filling / circumference and the organ-balanced sampler on real data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from usfm_edge.core.errors import ConfigError, DataError
from usfm_edge.core.geometry import fill_holes
from usfm_edge.data import (
    BUSBRA_LABELS,
    DataSource,
    fill_outline_mask,
    head_circumference_mm,
    label_fraction,
    label_names,
    load_records,
    parse_source,
    patient_split,
    read_image,
    read_mask,
    read_record_mask,
)
from usfm_edge.data import sample_dir as bundled_sample_dir


def _patients(records) -> set[tuple[str, str]]:
    return {(r.organ, r.patient) for r in records}


@pytest.fixture(scope="module")
def busbra(sample_dir):
    return load_records(f"busbra:{sample_dir / 'busbra'}")


@pytest.fixture(scope="module")
def hc18(sample_dir):
    return load_records(f"hc18:{sample_dir / 'hc18'}")


# ---- specs -----------------------------------------------------------------------------------------------


def test_parse_source():
    assert parse_source("busbra:/data/bus") == DataSource("busbra", Path("/data/bus"))
    assert parse_source("folder:/x/thyroid scans@thyroid") == DataSource("folder", Path("/x/thyroid scans"), "thyroid")
    assert parse_source("folder:/x/a@b/c").path == Path("/x/a@b/c")  # '@' inside a path is not a tag
    src = parse_source("pairs:/i,/m@liver")
    assert (src.path, src.masks, src.organ) == (Path("/i"), Path("/m"), "liver")
    assert parse_source(str(bundled_sample_dir())).kind == "folder"
    for bad in ("mri:/x", "nothing-here", "busbra:", "pairs:/only"):
        with pytest.raises(ConfigError):
            parse_source(bad)


def test_sample_dir_is_the_bundled_sample(sample_dir):
    assert bundled_sample_dir() == sample_dir.resolve()
    assert (sample_dir / "busbra" / "LICENSE.txt").is_file() and (sample_dir / "hc18" / "LICENSE.txt").is_file()
    size = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file())
    assert size < 6e6


# ---- adapters on the bundled sample ----------------------------------------------------------------------


def test_busbra_sample(busbra):
    assert len(busbra) == 22 and len(_patients(busbra)) == 12
    assert label_names(busbra) == list(BUSBRA_LABELS)
    assert {r.label for r in busbra} == {0, 1} and all(r.label_name == BUSBRA_LABELS[r.label] for r in busbra)
    assert len({r.device for r in busbra}) >= 3 and all(r.organ == "breast" for r in busbra)
    views = Counter(r.patient for r in busbra)
    assert max(views.values()) == 2
    for r in busbra[::5] + [r for r in busbra if r.patient == "856"]:  # 856: csv Width/Height are wrong
        mask = read_record_mask(r)
        assert mask.shape == read_image(r.image).shape and set(np.unique(mask)) == {0, 1}


def test_hc18_sample(hc18):
    assert len(hc18) == 17 and len(_patients(hc18)) == 12
    assert all(r.fill_outline and r.organ == "fetal_head" and r.pixel_size_mm > 0 and r.hc_mm > 0 for r in hc18)
    assert sum(r.patient == "014" for r in hc18) == 3 and label_names(hc18) == []


def test_busbra_skips_missing_images_but_not_all(tmp_path, sample_dir):
    root = tmp_path / "bus"
    shutil.copytree(sample_dir / "busbra", root)
    with open(root / "bus_data.csv", "a") as f:
        f.write('bus_9999-s,9999,fibroadenoma,benign,3,GE Logiq 5 @10-12MHz,300,300,single,"[1,1,2,2]"\n')
    assert len(load_records(f"busbra:{root}")) == 22
    shutil.rmtree(root / "Images")
    with pytest.raises(DataError):
        load_records(f"busbra:{root}")
    with pytest.raises(DataError, match="bus_data.csv"):
        load_records(f"busbra:{tmp_path}")


def test_pairs_and_folder_split_by_a_patient_key(tmp_path, sample_dir):
    """pairs:/folder: take the patient from a regex over the file name or a table; the split keeps views together."""
    import warnings

    from usfm_edge.data.splits import patient_split

    images, masks = sample_dir / "busbra/Images", sample_dir / "busbra/Masks"
    spec = f"pairs:{images},{masks}?patient=bus_(\\d+)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a keyed source does not warn
        keyed = load_records(spec)
    assert parse_source(spec).patient_regex == "bus_(\\d+)" and str(parse_source(spec)).endswith("?patient=bus_(\\d+)")
    by_patient: dict[str, set] = {}
    for r in keyed:
        by_patient.setdefault(r.patient, set()).add(r.image.name)
    assert len(by_patient) < len(keyed), "the sample holds left and right views of one patient"
    assert all(name.startswith(f"bus_{pid}-") for pid, names in by_patient.items() for name in names)
    train, val = patient_split(keyed, 0.5, seed=0)
    assert not {r.patient for r in train} & {r.patient for r in val}
    # the same key from a table (file,patient), for a folder source
    table = tmp_path / "patients.csv"
    table.write_text("file,patient\n" + "".join(f"{p.name},P{p.name[4:8]}\n" for p in sorted(images.glob("*.png"))))
    folder = load_records(f"folder:{images}?patients={table}")
    assert {r.patient for r in folder} == {f"P{pid}" for pid in by_patient}
    # bad keys are refused with the file named
    with pytest.raises(DataError, match="does not match") as err:
        load_records(f"pairs:{images},{masks}?patient=^hc_(\\d+)")
    assert "bus_" in str(err.value)
    with pytest.raises(ConfigError, match="bad patient regex"):
        parse_source("folder:/x?patient=(")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_source("folder:/x?subject=1")
    table.write_text("file,patient\nnone.png,P1\n")
    with pytest.raises(DataError, match="not listed in the patient table"):
        load_records(f"folder:{images}?patients={table}")


def test_folder_pairs_and_csv_sources(tmp_path, sample_dir):
    records = load_records(f"folder:{sample_dir}")
    assert len(records) == 22 + 17  # annotations and masks are not images
    assert {r.organ for r in records} == {"busbra", "hc18"}
    tagged = load_records(f"folder:{sample_dir / 'hc18'}@fetal")
    assert len(tagged) == 17 and {r.organ for r in tagged} == {"fetal"}
    with pytest.warns(UserWarning, match="splits per image"):
        pairs = load_records(f"pairs:{sample_dir / 'busbra/Images'},{sample_dir / 'busbra/Masks'}")
    assert len(pairs) == 22 and all(r.mask.name == r.image.name.replace("bus_", "mask_") for r in pairs)
    same = load_records(f"pairs:{sample_dir / 'hc18/training_set'},{sample_dir / 'hc18/training_set'}")
    assert len(same) == 17 and all(r.mask.stem == r.image.stem + "_Annotation" for r in same)

    images = sorted((sample_dir / "busbra" / "Images").glob("*.png"))[:4]
    (tmp_path / "labels.csv").write_text(
        "path,label,patient\n"
        + "".join(f"{p},{['malignant', 'benign'][i % 2]},p{i // 2}\n" for i, p in enumerate(images))
    )
    table = load_records(f"csv:{tmp_path / 'labels.csv'}")
    assert [r.label for r in table] == [1, 0, 1, 0] and label_names(table) == ["benign", "malignant"]
    assert len(_patients(table)) == 2

    shutil.copy(images[0], tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("path,organ,label\na.png,thyroid,2\n")
    (only,) = load_records(f"folder:{tmp_path}")
    assert (only.organ, only.label, only.patient) == ("thyroid", 2, "a")
    with pytest.raises(DataError):
        load_records(f"folder:{tmp_path / 'missing'}")


# ---- splits ----------------------------------------------------------------------------------------------


def test_patient_split_is_disjoint_and_deterministic(busbra, hc18):
    records = busbra + hc18
    train, val = patient_split(records, 0.25, seed=1)
    assert not _patients(train) & _patients(val) and len(train) + len(val) == len(records)
    assert 4 <= len(_patients(val)) <= 8 and {r.label for r in val if r.label is not None} == {0, 1}
    assert patient_split(records[::-1], 0.25, seed=1)[1] == val[::-1]
    assert patient_split(records, 0.25, seed=1) == (train, val)
    assert _patients(patient_split(records, 0.25, seed=2)[1]) != _patients(val)
    with pytest.raises(ConfigError):
        patient_split(records, 1.0)


def test_label_fraction_samples_patients(busbra):
    small = label_fraction(busbra, 0.2, seed=3)
    kept = _patients(small)
    assert {r.label for r in small} == {0, 1} and len(kept) == 2  # round(0.2 * 6) = 1 per class
    assert all(r in small for r in busbra if (r.organ, r.patient) in kept)  # whole patients
    assert label_fraction(busbra, 0.2, seed=3) == small
    assert kept <= _patients(label_fraction(busbra, 0.5, seed=3))  # nested
    assert len(_patients(label_fraction(busbra, 0.01))) >= 1 and label_fraction(busbra, 1.0) == busbra
    with pytest.raises(ConfigError):
        label_fraction(busbra, 0.0)


# ---- HC18 geometry ---------------------------------------------------------------------------------------


def test_fill_outline_and_head_circumference(hc18):
    for r in hc18:
        outline = read_mask(r.mask)
        filled = read_record_mask(r)
        assert set(np.unique(filled)) == {0, 1} and filled.sum() > 10 * outline.sum()
        assert abs(head_circumference_mm(filled, r.pixel_size_mm) - r.hc_mm) < 2.0, r.image.name


def test_fill_open_outline_and_empty(hc18):
    outline = read_mask(hc18[0].mask)
    closed = fill_outline_mask(outline)
    cut = outline.copy()
    cy, cx = np.argwhere(closed).mean(axis=0).astype(int)
    cut[:cy, cx - 6 : cx + 6] = 0  # open a 12-pixel gap in the top of the ellipse
    assert fill_holes(cut > 0).sum() < 2 * cut.sum()  # hole filling alone finds nothing inside
    opened = fill_outline_mask(cut)
    assert abs(int(opened.sum()) - int(closed.sum())) < 0.02 * closed.sum()
    assert fill_outline_mask(np.zeros((30, 40), np.uint8)).sum() == 0
    with pytest.raises(DataError):
        read_record_mask(load_records(f"folder:{hc18[0].image.parent}")[0])


# ---- full shared datasets --------------------------------------------------------------------------------


def test_full_busbra(shared_data):
    records = load_records(f"busbra:{shared_data / 'busbra'}")
    assert len(records) == 1492 and all(r.mask is not None for r in records)
    counts = Counter(r.label_name for r in records)
    assert counts == {"benign": 1006, "malignant": 486} and len({r.device for r in records}) >= 4
    train, val = patient_split(records, 0.2, seed=0)
    assert not _patients(train) & _patients(val)
    assert abs(len(_patients(val)) / len(_patients(records)) - 0.2) < 0.01
    tenth = label_fraction(records, 0.1, seed=0)
    assert abs(len(_patients(tenth)) / len(_patients(records)) - 0.1) < 0.01
    assert label_fraction(records, 0.1, seed=0) == tenth != label_fraction(records, 0.1, seed=1)


def test_full_hc18_circumference(shared_data):
    """The HC pipeline (filled outline to its centre line, contour, direct ellipse fit) on reference masks
    reproduces the CSV's circumference: the targets and the measurement follow the drawn line's centre."""
    records = load_records(f"hc18:{shared_data / 'hc18'}")
    assert len(records) >= 770 and len(_patients(records)) >= 600
    errors = np.array([head_circumference_mm(read_record_mask(r), r.pixel_size_mm) - r.hc_mm for r in records[::7]])
    assert np.abs(errors).max() < 0.35 and abs(errors.mean()) < 0.1, (errors.mean(), np.abs(errors).max())


def test_hc18_split_is_random_over_trimesters(shared_data):
    """HC18 files are numbered by gestational age: a patient split must draw subjects at random."""
    records = load_records(f"hc18:{shared_data / 'hc18'}")
    train, val = patient_split(records, 0.2, seed=0)
    assert not _patients(train) & _patients(val)
    val_hc = np.array([r.hc_mm for r in val])
    assert (val_hc < 150).sum() >= 10 and (val_hc > 250).sum() >= 5  # every trimester is held out
    ids = sorted(int(r.patient) for r in val)
    assert ids[0] < 100 and ids[-1] > 700


# ---- organ-balanced sampler ------------------------------------------------------------------------------


def test_sampler_balances_organs_and_covers_small_ones():
    from usfm_edge import data

    organs = ["breast"] * 100 + ["thyroid"] * 10
    sampler = data.OrganBalancedSampler(organs, num_samples=1000, seed=0)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 1000
    assert Counter(organs[i] for i in draws) == {"breast": 500, "thyroid": 500}
    assert set(range(100, 110)) <= set(draws) and Counter(d for d in draws if d >= 100).most_common(1)[0][1] == 50
    weighted = data.OrganBalancedSampler(organs, weights={"breast": 3, "thyroid": 1})
    assert len(weighted) == 110 and Counter(organs[i] for i in weighted)["thyroid"] in (27, 28)
    with pytest.raises(ConfigError):
        data.OrganBalancedSampler(organs, weights={"liver": 1.0})


def test_sampler_is_deterministic_and_shards_for_ddp():
    import torch.utils.data

    from usfm_edge.data.sampler import OrganBalancedSampler

    organs = ["a"] * 100 + ["b"] * 100
    make = lambda **kw: OrganBalancedSampler(organs, seed=5, **kw)  # noqa: E731
    assert isinstance(make(), torch.utils.data.Sampler)
    assert list(make()) == list(make())
    moved = make()
    moved.set_epoch(1)
    assert list(moved) != list(make()) and sorted(moved) == list(range(200))
    shards = []
    for rank in range(3):
        s = make(rank=rank, world_size=3)
        s.set_epoch(1)
        shards.append(list(s))
    assert all(len(s) == 200 // 3 for s in shards)
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    loader = torch.utils.data.DataLoader(list(range(200)), batch_size=16, sampler=make(rank=1, world_size=2))
    assert sum(len(b) for b in loader) == 100
