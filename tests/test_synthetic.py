"""The synthetic concept generator: determinism, masks that agree with the pixels, geometry, layout."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time

import numpy as np
import pytest
from PIL import Image

from convscope.data import SynthConfig, generate, render_sample
from convscope.data.synthetic import DEFAULT_COLORS, shape_mask
from convscope.errors import DataError

CFG = SynthConfig()


@pytest.fixture(scope="module")
def samples():
    return [render_sample(i, 112, seed=3) for i in range(60)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth200")
    t0 = time.perf_counter()
    generate(out, n=200, size=112, seed=0, progress=False)
    print(f"\ngenerated 200 images at 112 px in {time.perf_counter() - t0:.2f} s (1 worker)")
    return out


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_or_index_differs():
    a, b = render_sample(7, 112, seed=0), render_sample(7, 112, seed=0)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(a.masks[k].tobytes() == b.masks[k].tobytes() for k in a.masks)
    assert a.scene == b.scene and np.array_equal(a.target_mask, b.target_mask)
    assert render_sample(7, 112, seed=1).image.tobytes() != a.image.tobytes()
    assert render_sample(8, 112, seed=0).image.tobytes() != a.image.tobytes()


def test_generate_is_deterministic_and_workers_give_identical_files(tmp_path):
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    generate(one, n=12, size=64, seed=4, workers=1, progress=False)
    generate(two, n=12, size=64, seed=4, workers=2, progress=False)
    generate(other, n=12, size=64, seed=5, workers=1, progress=False)
    d1, d2, d3 = _digest(one), _digest(two), _digest(other)
    assert d1 == d2
    assert d1.keys() == d3.keys()
    assert d1["images/synth/000003.png"] != d3["images/synth/000003.png"]
    assert not any(".tmp" in k for k in d1), "atomic writes left temp files"


def test_any_index_can_be_regenerated_alone(folder):
    # a subset re-rendered in memory equals the files written by the full run
    for i in (0, 57, 199):
        sample = render_sample(i, 112, seed=0)
        on_disk = np.asarray(Image.open(folder / "images" / "synth" / f"{i:06d}.png"))
        assert np.array_equal(on_disk, sample.image)


# --------------------------------------------------------------------------- masks agree with pixels


def test_colour_masks_match_the_painted_colours(samples):
    tol_px = CFG.color_jitter + 6 * CFG.noise_sigma + 1
    seen = set()
    for s in samples:
        for name, rgb in CFG.colors:
            num = CFG.number("color", name)
            m = s.masks["color"] == num
            if not m.any():
                continue
            px = s.image[m].astype(np.float64)
            assert np.abs(px - rgb).max() <= tol_px, name
            assert np.abs(px.mean(axis=0) - rgb).max() <= CFG.color_jitter + 2, name
            seen.add(name)
    assert seen == {n for n, _ in DEFAULT_COLORS}


def test_unlabelled_colour_only_on_photos(samples):
    photo_tex = [CFG.number("texture", t) for t in CFG.photo_textures]
    for s in samples:
        in_photo_tex = np.isin(s.masks["texture"], photo_tex)
        assert (s.masks["color"][in_photo_tex] == 0).all()
        # procedural textures are painted with two named colours, so they always carry a colour
        assert np.isin(s.masks["texture"][s.masks["color"] == 0], [0, *photo_tex]).all()
        # photo textures are grey: channels agree up to the noise
        if in_photo_tex.sum() > 50:
            px = s.image[in_photo_tex].astype(np.float64)
            assert np.abs(px[:, 0] - px[:, 1]).mean() < 3 * CFG.noise_sigma


def test_stripe_labels_follow_the_stripe_direction(samples):
    def change_rate(col, region, axis):
        changed = np.diff(col, axis=axis) != 0
        both = (region[:-1] & region[1:]) if axis == 0 else (region[:, :-1] & region[:, 1:])
        return (changed & both).sum() / max(both.sum(), 1)

    for orient, across in (("horizontal", 0), ("vertical", 1)):
        nums = [CFG.number("texture", f"stripes-{orient}-{p}") for p, _, _ in CFG.stripe_periods]
        checked = 0
        for s in samples:
            region = np.isin(s.masks["texture"], nums)
            if region.sum() < 300:
                continue
            col = s.masks["color"]
            assert change_rate(col, region, across) > 3 * change_rate(col, region, 1 - across), orient
            checked += 1
        assert checked >= 2, f"too few {orient} stripe regions to check"


# --------------------------------------------------------------------------- geometry

AREA_OVER_R2 = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "hexagon": 3 * math.sqrt(3) / 2,
    "ring": math.pi * (1 - 0.6**2),
    "cross": 8 * 0.32 * math.sqrt(1 - 0.32**2) - 4 * 0.32**2,
    "star": 5 * 0.45 * math.sin(math.pi / 5),
}


@pytest.mark.parametrize("shape", list(AREA_OVER_R2))
def test_shape_area_and_centroid(shape):
    r, cy, cx = 30.0, 55.3, 60.7
    m = shape_mask(shape, 112, cy, cx, r, angle=0.4)
    assert abs(m.sum() / (AREA_OVER_R2[shape] * r * r) - 1) < 0.03
    ys, xs = np.nonzero(m)
    assert abs(ys.mean() - cy) < 0.5 and abs(xs.mean() - cx) < 0.5
    assert ((ys - cy) ** 2 + (xs - cx) ** 2).max() <= r * r


def test_crescent_is_a_bitten_circle():
    disc = shape_mask("circle", 112, 56, 56, 30)
    cres = shape_mask("crescent", 112, 56, 56, 30, angle=1.0)
    assert not (cres & ~disc).any()
    assert 0.2 * disc.sum() < cres.sum() < 0.7 * disc.sum()


def test_rendered_circles_have_circle_area_and_centre(samples):
    circle_scene = CFG.number("scene", "circle" + CFG.scene_suffix)
    found = 0
    for s in samples:
        if s.scene != circle_scene:
            continue
        ys, xs = np.nonzero(s.target_mask)
        r = (ys.max() - ys.min() + 1 + xs.max() - xs.min() + 1) / 4
        cy, cx = (ys.max() + ys.min()) / 2, (xs.max() + xs.min()) / 2
        assert abs(len(ys) / (math.pi * r * r) - 1) < 0.05
        assert abs(ys.mean() - cy) < 0.5 and abs(xs.mean() - cx) < 0.5
        found += 1
    assert found >= 2


def test_scene_is_the_largest_object_and_target_mask_is_its_mask(samples):
    scenes = CFG.category_labels()["scene"]
    for s in samples:
        assert s.scene in scenes
        obj = CFG.number("object", CFG.shapes[CFG.scene_class(s.scene)])
        assert s.target_mask.dtype == bool and s.target_mask.any()
        # distractors are of other classes and the target is drawn last, fully inside the image
        assert np.array_equal(s.target_mask, s.masks["object"] == obj)
        border = np.concatenate([s.target_mask[0], s.target_mask[-1], s.target_mask[:, 0], s.target_mask[:, -1]])
        assert not border.any()
        others = [np.count_nonzero(s.masks["object"] == k) for k in np.unique(s.masks["object"]) if k not in (0, obj)]
        assert all(a < s.target_mask.sum() for a in others)


# --------------------------------------------------------------------------- the written folder


def test_generate_writes_the_broden_layout(folder):
    for name in ("index.csv", "label.csv", "category.csv", "target.csv", "synth.json"):
        assert (folder / name).is_file(), name
    for cat in ("color", "object", "scene", "texture"):
        assert (folder / f"c_{cat}.csv").is_file()
    with open(folder / "index.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "scene", "texture"]
    assert len(rows) == 201
    scenes = CFG.category_labels()["scene"]
    assert all(r[8].isdigit() and int(r[8]) in scenes for r in rows[1:]), "every image has one scene number"
    assert {int(r[8]) for r in rows[1:]} == set(scenes)
    assert rows[1][6] == "synth/000000_color.png" and rows[1][2:6] == ["112"] * 4
    val = sum(r[1] == "val" for r in rows[1:])
    assert {r[1] for r in rows[1:]} == {"train", "val"} and 20 <= val <= 60
    meta = json.loads((folder / "synth.json").read_text())
    assert (meta["n"], meta["size"], meta["seed"]) == (200, 112, 0)
    assert not list(folder.rglob("*.tmp"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shapes=("circle", "blob")), "blob"),
        (dict(shapes=("circle",)), "at least 2"),
        (dict(patterns=("dots", "plaid")), "plaid"),
        (dict(photo_textures=("brick", "marble")), "marble"),
        (dict(distractor_radius=(0.1, 0.3)), "distractor_radius"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(colors=DEFAULT_COLORS[:-1] + (("circle", (1, 2, 3)),)), "unique"),
    ],
)
def test_bad_config_raises_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        SynthConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(size=8), dict(seed=-1), dict(workers=0)])
def test_bad_generate_arguments(tmp_path, kwargs):
    with pytest.raises(DataError):
        generate(tmp_path / "x", **{"n": 2, "progress": False, **kwargs})


def test_render_arrays_equals_render_sample_in_any_number_of_processes():
    from convscope.data.synthetic import SynthConfig, render_arrays, render_sample

    one = render_arrays(5, 6, size=48, seed=3, workers=1, progress=False, masks=True)
    two = render_arrays(5, 6, size=48, seed=3, workers=2, progress=False, masks=True)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)
    for i in range(6):
        s = render_sample(5 + i, size=48, seed=3)
        assert np.array_equal(one.images[i], s.image) and np.array_equal(one.target_masks[i], s.target_mask)
        assert one.scenes[i] == SynthConfig().scene_class(s.scene)
    assert render_arrays(0, 2, size=48, progress=False).target_masks is None


def test_render_arrays_objects_name_the_shape_drawn_at_each_pixel():
    from convscope.data.synthetic import SynthConfig, render_arrays, render_sample

    cfg = SynthConfig()
    arr = render_arrays(7, 4, size=48, seed=2, workers=1, progress=False, masks=True, objects=True)
    assert arr.objects is not None and arr.objects.dtype == np.int8 and arr.objects.shape == (4, 48, 48)
    names = cfg.label_names()
    for i in range(4):
        s = render_sample(7 + i, size=48, seed=2)
        expected = np.vectorize(lambda v: cfg.shapes.index(names[v]) if v else len(cfg.shapes))(s.masks["object"])
        assert np.array_equal(arr.objects[i], expected)
        # the dominant object's pixels carry the scene's class
        assert (arr.objects[i][s.target_mask] == arr.scenes[i]).all()
    assert render_arrays(0, 2, size=48, progress=False).objects is None
