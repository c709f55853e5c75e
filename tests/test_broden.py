"""Broden-format I/O: label encoding, writer -> reader round trips, a hand-made real-Broden-like folder,
and a clear DataError (naming the file) for every malformed case."""

from __future__ import annotations

import csv
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.data import (
    BrodenDataset,
    BrodenSample,
    broden_collate,
    decode_label_png,
    encode_labels,
    generate,
    render_sample,
    write_broden,
)
from convscope.data.broden import BrodenError, same_extent, save_sample, worker_message
from convscope.errors import DataError

# --------------------------------------------------------------------------- encoding


def test_label_numbers_round_trip_through_png_including_above_255(tmp_path):
    labels = np.array([[0, 1, 255, 256], [257, 1000, 4095, 65535]], dtype=np.int64)
    rgb = encode_labels(labels)
    assert rgb[1, 0].tolist() == [1, 1, 0]  # 257 = 1 + 256 * 1
    Image.fromarray(rgb).save(tmp_path / "l.png")
    assert np.array_equal(decode_label_png(tmp_path / "l.png"), labels)


@pytest.mark.parametrize("bad", [np.array([[65536]]), np.array([[-1]]), np.zeros((2, 2, 2), dtype=int)])
def test_encode_rejects_unencodable_maps(bad):
    with pytest.raises(DataError):
        encode_labels(bad)


# --------------------------------------------------------------------------- writer -> reader

LABELS = {1: "black", 2: "red", 3: "sky", 4: "person", 300: "wheel", 5: "street-s", 6: "city-s"}
CATEGORIES = {"color": [1, 2], "object": [3, 4], "part": [300, 4], "scene": [5, 6]}


def _samples(rng):
    out = []
    for k in range(3):
        color = rng.choice([0, 1, 2], size=(6, 5))
        obj = rng.choice([0, 3, 4], size=(6, 5))
        part = np.stack([rng.choice([0, 300], size=(6, 5)), rng.choice([0, 4], size=(6, 5))])[: 1 + k % 2]
        out.append(
            BrodenSample(
                name=f"set/img{k}",
                image=rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8),
                seg={"color": color, "object": obj, "part": part},
                image_labels={"scene": [5 + k % 2]},
                split="train" if k else "val",
            )
        )
    return out


def test_write_read_round_trip_reproduces_every_mask_and_label(tmp_path):
    samples = _samples(np.random.default_rng(0))
    write_broden(tmp_path, samples, LABELS, CATEGORIES)
    with open(tmp_path / "index.csv", newline="") as f:
        assert next(csv.reader(f)) == ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "scene"]
    with open(tmp_path / "label.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["number", "name", "category", "frequency", "coverage", "syns"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6", "300"]  # label 0 is implicit, as in Broden

    ds = BrodenDataset(tmp_path)
    assert len(ds) == 3 and ds.categories == ["color", "object", "part", "scene"]
    assert ds.pixel_categories == ["color", "object", "part"] and ds.image_categories == ["scene"]
    for i, s in enumerate(samples):
        item = ds[i]
        assert np.array_equal(item["image"], s.image)
        assert item["split"] == s.split
        for cat in ("color", "object"):
            assert np.array_equal(item["seg"][cat], s.seg[cat][None])
        assert np.array_equal(item["seg"]["part"], s.seg["part"])
        assert item["labels_image_level"] == {"scene": list(s.image_labels["scene"])}
    assert ds.label_names[300] == "wheel" and ds.label_names[7] == ""
    assert ds.category_labels["part"] == [300, 4]
    # frequency = number of images showing the label, per category
    person_obj = sum(bool((s.seg["object"] == 4).any()) for s in samples)
    person_part = sum(bool((s.seg["part"] == 4).any()) for s in samples)
    assert ds.labels[4].categories == {"object": person_obj, "part": person_part} or ds.labels[4].categories == {
        "part": person_part,
        "object": person_obj,
    }
    assert ds.labels[4].frequency == person_obj + person_part
    with open(tmp_path / "category.csv", newline="") as f:
        cat_rows = {r["name"]: r for r in csv.DictReader(f)}
    assert (cat_rows["part"]["first"], cat_rows["part"]["last"], cat_rows["part"]["count"]) == ("4", "300", "2")


def test_writer_rejects_undeclared_labels(tmp_path):
    s = _samples(np.random.default_rng(1))[0]
    with pytest.raises(DataError, match="not declared in category 'color'"):
        write_broden(tmp_path, [s], LABELS, {**CATEGORIES, "color": [1], "object": [3, 4, 2]})
    with pytest.raises(DataError, match="no category"):
        write_broden(tmp_path / "b", [s], {**LABELS, 9: "orphan"}, CATEGORIES)
    with pytest.raises(DataError, match="unique"):
        write_broden(tmp_path / "c", [s], {**LABELS, 7: "sky"}, {**CATEGORIES, "object": [3, 4, 7]})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, n=10, size=64, seed=2, progress=False)
    return root


def test_generated_folder_reads_back_exactly(synth):
    ds = BrodenDataset(synth)
    assert len(ds) == 10
    assert ds.pixel_categories == ["color", "object", "texture"] and ds.image_categories == ["scene"]
    counts = {}
    for i in range(len(ds)):
        ref = render_sample(i, 64, seed=2)
        item = ds[i]
        assert np.array_equal(item["image"], ref.image)
        for cat, m in ref.masks.items():
            assert np.array_equal(item["seg"][cat], m[None]), cat
        assert item["labels_image_level"]["scene"] == [ref.scene]
        obj = ref.masks["object"]
        assert ds.target(i) == ("object", int(obj[ref.target_mask][0]))
        for k in np.unique(obj[obj > 0]):
            counts[int(k)] = counts.get(int(k), 0) + 1
    with open(synth / "c_object.csv", newline="") as f:
        freq = {int(r["number"]): int(r["frequency"]) for r in csv.DictReader(f)}
    assert {k: v for k, v in freq.items() if v} == counts


def test_split_size_and_seg_size(synth):
    full = BrodenDataset(synth)
    val = BrodenDataset(synth, split="val", size=48, seg_size=32, categories=["object", "scene"])
    assert 0 < len(val) < len(full) and all(val[i]["split"] == "val" for i in range(len(val)))
    item = val[0]
    assert item["image"].shape == (48, 48, 3)
    assert set(item["seg"]) == {"object"} and item["seg"]["object"].shape == (1, 32, 32)
    ref = render_sample(_index_of(item["image_path"]), 64, seed=2).masks["object"]  # index in the full set
    assert np.array_equal(item["seg"]["object"][0], ref[1::2, 1::2])  # nearest: centre of each 2x2 cell


def _index_of(path):
    return int(path.rsplit("/", 1)[1].split(".")[0])


def test_collate_for_a_dataloader(synth):
    loader = torch.utils.data.DataLoader(BrodenDataset(synth), batch_size=4, collate_fn=broden_collate)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= 0.0 and batch["images"].max() <= 1.0
    assert batch["seg"]["object"].shape == (4, 1, 64, 64) and batch["seg"]["object"].dtype == torch.int64
    assert len(batch["labels_image_level"]["scene"]) == 4 and batch["index"].tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- a real-Broden-like folder

REAL_HEADER = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture"]
A_COLOR = np.array([[1, 1, 2, 2]] * 4)
A_OBJECT = np.array([[3, 3, 0, 0], [3, 3, 0, 0], [4, 4, 4, 0], [4, 4, 4, 0]])
A_PART1 = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [300, 300, 0, 0], [0, 0, 0, 0]])
A_PART2 = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 4, 0], [0, 0, 4, 0]])
B_OBJECT = np.array([[3] * 4, [3] * 4, [0] * 4, [0] * 4])


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encode_labels(labels)).save(path)


def make_real_like(root):
    """A tiny folder in the layout of a real Broden download (broden1_224): JPEG images 8x8,
    segmentations at half size 4x4, part with two layers, scene and texture as label numbers."""
    img = root / "images"
    for name in ("ade20k/a.jpg", "ade20k/b.jpg", "dtd/c.jpg"):
        (img / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(img / name)
    _png(img / "ade20k/a_color.png", A_COLOR)
    _png(img / "ade20k/a_object.png", A_OBJECT)
    _png(img / "ade20k/a_part_1.png", A_PART1)
    _png(img / "ade20k/a_part_2.png", A_PART2)
    _png(img / "ade20k/b_color.png", np.ones((4, 4), int))
    _png(img / "ade20k/b_object.png", B_OBJECT)
    _png(img / "dtd/c_color.png", np.full((4, 4), 2))
    _write_csv(
        root / "index.csv",
        [
            REAL_HEADER,
            ["ade20k/a.jpg", "train", 8, 8, 4, 4, "ade20k/a_color.png", "ade20k/a_object.png",
             "ade20k/a_part_1.png;ade20k/a_part_2.png", "", "6", "7;8"],
            ["ade20k/b.jpg", "val", 8, 8, 4, 4, "ade20k/b_color.png", "ade20k/b_object.png", "", "", "0", ""],
            ["dtd/c.jpg", "train", 8, 8, 4, 4, "dtd/c_color.png", "", "", "", "", "7"],
        ],
    )  # fmt: skip
    _write_csv(
        root / "label.csv",
        [
            ["number", "name", "category", "frequency", "coverage", "syns"],
            [1, "black", "color(2)", 2, "0.750000", ""],
            [2, "red", "color(2);object(1)", 3, "1.500000", "crimson"],
            [3, "sky", "object(2)", 2, "0.750000", ""],
            [4, "person", "object(1);part(1)", 2, "0.500000", "individual;someone"],
            [5, "wood", "material(1)", 1, "0.100000", ""],
            [6, "street-s", "scene(1)", 1, "1.000000", ""],
            [7, "striped", "texture(2)", 2, "2.000000", ""],
            [8, "banded", "texture(1)", 1, "1.000000", ""],
            [300, "wheel", "part(1)", 1, "0.125000", ""],
        ],
    )
    _write_csv(
        root / "category.csv",
        [
            ["name", "first", "last", "count", "frequency"],
            ["color", 1, 2, 2, 4],
            ["object", 2, 4, 3, 4],
            ["part", 4, 300, 2, 2],
            ["material", 5, 5, 1, 1],
            ["scene", 6, 6, 1, 1],
            ["texture", 7, 8, 2, 3],
        ],
    )
    codes = {"color": [1, 2], "object": [3, 4, 2], "part": [4, 300], "material": [5], "scene": [6], "texture": [7, 8]}
    for cat, nums in codes.items():
        rows = [["code", "number", "name", "frequency", "coverage"]]
        rows += [[k, n, f"label{n}", 1, "0.5"] for k, n in enumerate(nums, start=1)]
        _write_csv(root / f"c_{cat}.csv", rows)
    return root


@pytest.fixture
def real(tmp_path):
    return make_real_like(tmp_path / "broden1_like")


def test_reads_a_real_broden_like_folder(real):
    ds = BrodenDataset(real)
    assert len(ds) == 3
    assert ds.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert ds.pixel_categories == ["color", "object", "part", "material"]
    assert ds.image_categories == ["scene", "texture"]
    a = ds[0]
    assert a["image"].shape == (8, 8, 3) and a["image_path"].endswith("images/ade20k/a.jpg")
    assert np.array_equal(a["seg"]["color"], A_COLOR[None])
    assert np.array_equal(a["seg"]["object"], A_OBJECT[None])
    assert a["seg"]["part"].shape == (2, 4, 4)
    assert np.array_equal(a["seg"]["part"], np.stack([A_PART1, A_PART2]))  # ';' fields stack, 300 decodes
    assert a["seg"]["material"].shape == (0, 4, 4)
    assert a["labels_image_level"] == {"scene": [6], "texture": [7, 8]}
    b = ds[1]
    assert b["labels_image_level"] == {"scene": [], "texture": []}  # scene 0 means unlabeled (NetDissect-Lite#28)
    assert b["seg"]["part"].shape == (0, 4, 4)
    assert ds.label_names[:4] == ["-", "black", "red", "sky"] and ds.label_names[300] == "wheel"
    assert ds.category_of_label[2] == "color" and ds.category_of_label[4] == "object"
    assert ds.labels[4].syns == ("individual", "someone") and ds.labels[2].categories == {"color": 2, "object": 1}
    assert ds.category_labels["object"] == [3, 4, 2]
    assert ds.label_number("wheel") == 300 and ds.label_number("person", "part") == 4
    assert ds.splits == ["train", "val"] and len(BrodenDataset(real, split="val")) == 1

    batch = broden_collate([ds[i] for i in range(3)])
    assert batch["seg"]["part"].shape == (3, 2, 4, 4) and not batch["seg"]["part"][1:].any()  # padded with 0
    assert batch["labels_image_level"]["texture"] == [[7, 8], [], [7]]


def test_category_subset_of_real_folder(real):
    ds = BrodenDataset(real, categories=["part", "scene"])
    item = ds[0]
    assert set(item["seg"]) == {"part"} and set(item["labels_image_level"]) == {"scene"}
    assert ds.category_of_label[4] == "part"  # primary category among the selected ones


# --------------------------------------------------------------------------- malformed folders


def _edit_csv(path, fn):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    fn(rows)
    _write_csv(path, rows)


def _set(row, col, value):
    def fn(rows):
        rows[row][col] = value

    return fn


BROKEN = {
    "no index": (lambda r: (r / "index.csv").unlink(), "index.csv"),
    "no label": (lambda r: (r / "label.csv").unlink(), "label.csv"),
    "no category": (lambda r: (r / "category.csv").unlink(), "category.csv"),
    "no c_part": (lambda r: (r / "c_part.csv").unlink(), "c_part.csv"),
    "short row": (lambda r: _edit_csv(r / "index.csv", lambda rows: rows.append(rows[1][:-1])), "index.csv line 5"),
    "long row": (lambda r: _edit_csv(r / "index.csv", lambda rows: rows[2].append("x")), "index.csv line 3"),
    "missing png": (lambda r: (r / "images/ade20k/a_part_2.png").unlink(), "a_part_2.png"),
    "missing image": (lambda r: (r / "images/ade20k/b.jpg").unlink(), "b.jpg"),
    "unknown scene": (lambda r: _edit_csv(r / "index.csv", _set(1, 10, "42")), "index.csv line 2"),
    "unknown texture": (lambda r: _edit_csv(r / "index.csv", _set(3, 11, "7;9")), "index.csv line 4"),
    "bad size": (lambda r: _edit_csv(r / "index.csv", _set(2, 4, "four")), "index.csv line 3"),
    "bad header": (lambda r: _edit_csv(r / "index.csv", _set(0, 1, "fold")), "index.csv line 1"),
    "no column": (lambda r: _edit_csv(r / "index.csv", lambda rows: [x.pop() for x in rows]), "index.csv"),
    "bad category entry": (lambda r: _edit_csv(r / "label.csv", _set(3, 2, "object[2]")), "label.csv line 4"),
    "duplicate label": (lambda r: _edit_csv(r / "label.csv", _set(2, 0, "1")), "label.csv line 3"),
    "bad label number": (lambda r: _edit_csv(r / "label.csv", _set(2, 0, "two")), "label.csv line 3"),
    "code of unknown label": (lambda r: _edit_csv(r / "c_color.csv", _set(1, 1, "77")), "c_color.csv line 2"),
    "empty index": (lambda r: _edit_csv(r / "index.csv", lambda rows: rows.__delitem__(slice(1, None))), "index.csv"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_folder_raises_data_error_naming_the_file(real, case):
    breaker, where = BROKEN[case]
    breaker(real)
    with pytest.raises(DataError) as info:
        BrodenDataset(real)
    assert where in str(info.value)


def test_png_with_unknown_label_fails_when_read(real):
    _png(real / "images/ade20k/b_object.png", np.full((4, 4), 77))
    ds = BrodenDataset(real)  # PNG contents are checked on read
    with pytest.raises(DataError, match=r"b_object\.png.*77"):
        ds[1]


def test_png_of_wrong_size_fails_when_read(real):
    _png(real / "images/ade20k/b_color.png", np.ones((5, 4), int))
    with pytest.raises(DataError, match=r"b_color\.png.*sh=4"):
        BrodenDataset(real)[1]


def test_unknown_category_split_and_folder(real, tmp_path):
    with pytest.raises(DataError, match="did you mean part"):
        BrodenDataset(real, categories=["parts"])
    with pytest.raises(DataError, match="splits: train, val"):
        BrodenDataset(real, split="test")
    with pytest.raises(DataError, match="does not exist"):
        BrodenDataset(tmp_path / "nowhere")
    shutil.rmtree(real / "images")
    with pytest.raises(DataError, match="a.jpg"):
        BrodenDataset(real)
    assert len(BrodenDataset(real, check_files=False)) == 3


# ------------------------------------------------------------------ unusable masks / images: one line, workers too


def _one_line(info):
    msg = str(info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


BAD_MASKS = {
    "corrupt bytes": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), r"b_color\.png is corrupt or not a PNG"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:45]), r"b_color\.png is corrupt or not a PNG"),
    "wrong size": (lambda p: _png(p, np.ones((5, 4), int)),
                   r"b_color\.png is 5x4 but index\.csv line 3 says sh=4, sw=4 \(image 8x8\); resize the mask to 4x4"),
    "jpeg": (lambda p: Image.fromarray(np.ones((4, 4, 3), np.uint8)).save(p, format="JPEG"),
             r"b_color\.png is a lossy JPEG image.*save label maps as PNG"),
    "negative": (lambda p: Image.fromarray(np.full((4, 4), -3, np.int32)).save(p, format="TIFF"),
                 r"b_color\.png holds negative label numbers"),
    "float": (lambda p: Image.fromarray(np.ones((4, 4), np.float32)).save(p, format="TIFF"),
              r"b_color\.png is a floating-point image"),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_unusable_mask_is_one_line_naming_the_file(real, case):
    breaker, pattern = BAD_MASKS[case]
    breaker(real / "images/ade20k/b_color.png")
    ds = BrodenDataset(real)
    ds[0]  # other images still load
    with pytest.raises(DataError, match=pattern) as info:
        ds[1]
    _one_line(info)


@pytest.mark.parametrize("case", ["corrupt bytes", "wrong size"])
def test_mask_error_in_a_dataloader_worker_is_the_same_one_line(real, case):
    breaker, pattern = BAD_MASKS[case]
    breaker(real / "images/ade20k/b_color.png")
    loader = torch.utils.data.DataLoader(BrodenDataset(real), batch_size=3, num_workers=1, collate_fn=broden_collate)
    with pytest.raises(BrodenError, match=pattern) as info:
        next(iter(loader))
    assert "worker" not in _one_line(info)


def test_broden_error_survives_pickling_and_torch_rewrapping():
    from torch.utils.data._utils import ExceptionWrapper  # what a DataLoader worker sends back

    err = BrodenError("mask m.png is 5x4; fix it")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is BrodenError and str(again) == str(err)
    try:
        raise err
    except BrodenError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BrodenError) as info:
        wrapped.reraise()
    assert str(info.value) == "mask m.png is 5x4; fix it"
    plain = "Caught BrodenError somewhere else"  # not torch's text: kept as is
    assert worker_message(plain, BrodenError) == plain


def test_image_size_must_match_index(real):
    Image.fromarray(np.full((8, 6, 3), 120, np.uint8)).save(real / "images/dtd/c.jpg")
    ds = BrodenDataset(real)
    with pytest.raises(DataError, match=r"c\.jpg is 8x6 but index\.csv line 4 says ih=8, iw=8; fix ih/iw") as info:
        ds[2]
    _one_line(info)
    (real / "images/dtd/c.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"c\.jpg \(index\.csv line 4\) is corrupt or not an image") as info:
        ds[2]
    _one_line(info)


def test_segmentation_size_must_cover_the_image(real, tmp_path):
    _edit_csv(real / "index.csv", _set(3, 4, "2"))  # c: sh=2, sw=4 for an 8x8 image
    with pytest.raises(DataError, match=r"index\.csv line 4: segmentation size sh=2, sw=4 does not cover") as info:
        BrodenDataset(real)
    _one_line(info)
    assert same_extent(375, 500, 188, 250) and same_extent(8, 8, 4, 4) and not same_extent(375, 500, 250, 188)
    bad = BrodenSample("x/1", np.zeros((8, 8, 3), np.uint8), seg={"object": np.zeros((4, 2), int)})
    with pytest.raises(DataError, match="does not cover the 8x8 image"):
        save_sample(tmp_path, bad)
