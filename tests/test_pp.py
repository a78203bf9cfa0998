"""pp ops against independent numpy computations and properties; parse errors."""
import io

import numpy as np
import pytest
from PIL import Image

from big_vision_lite.input import pp


def run(pp_string, example, seed=0):
  return pp.get_preprocess_fn(pp_string)(example, np.random.default_rng(seed))


def random_image(h=20, w=30, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decode_png_bytes_and_arrays():
  image = random_image()
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  np.testing.assert_array_equal(run("decode", {"image": png.getvalue()})["image"], image)
  np.testing.assert_array_equal(run("decode", {"image": image})["image"], image)


def test_decode_rejects_wrong_rank_and_dtype():
  with pytest.raises(ValueError, match=r"'image' must be an \[H, W, 3\] image, got shape "
                     r"\(4, 4\) dtype uint8"):
    run("decode", {"image": np.zeros((4, 4), np.uint8)})
  with pytest.raises(ValueError, match=r"'photo' must be an \[H, W, 3\] image, got shape "
                     r"\(4, 4, 4\) dtype int32"):
    run('decode(key="photo")', {"photo": np.zeros((4, 4, 4), np.int32)})
  with pytest.raises(ValueError, match="must be uint8, got shape .* dtype float32"):
    run("decode", {"image": np.zeros((4, 4, 3), np.float32)})


def test_value_range_is_affine():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = run("value_range(-1, 1)", {"image": image})["image"]
  np.testing.assert_allclose(out, [[[-1.0, 1.0, -1.0 + 2 * 51 / 255]]], rtol=1e-6)
  assert out.dtype == np.float32
  out = run("value_range(0, 1, in_min=-1, in_max=1)", {"image": np.array([-1.0, 0.0, 1.0])})
  np.testing.assert_allclose(out["image"], [0.0, 0.5, 1.0])


def test_onehot():
  out = run('onehot(5, key="label", key_result="labels", on=0.9, off=0.025)', {"label": 3})
  np.testing.assert_allclose(out["labels"], [0.025, 0.025, 0.025, 0.9, 0.025])
  assert out["label"] == 3
  np.testing.assert_array_equal(run("onehot(3)", {"label": np.array([0, 2])})["label"],
                                np.eye(3)[[0, 2]])
  with pytest.raises(ValueError, match="out of range"):
    run("onehot(3)", {"label": 3})


def test_flip_twice_is_identity_and_flip_matches_numpy():
  image = random_image()
  outs = {run("flip_lr", {"image": image}, seed)["image"].tobytes() for seed in range(20)}
  assert outs == {image.tobytes(), image[:, ::-1].tobytes()}
  for seed in range(5):
    twice = pp.get_preprocess_fn("flip_lr|flip_lr")
    rng = np.random.default_rng(seed)
    first = rng.random() < 0.5
    second = rng.random() < 0.5
    expected = image[:, ::-1] if first != second else image
    np.testing.assert_array_equal(twice({"image": image}, np.random.default_rng(seed))["image"],
                                  expected)


def test_crops():
  image = random_image(20, 30)
  np.testing.assert_array_equal(run("central_crop(10)", {"image": image})["image"],
                                image[5:15, 10:20])
  crop = run("random_crop((8, 12))", {"image": image}, seed=3)["image"]
  assert crop.shape == (8, 12, 3)
  # The crop is a window of the original image.
  found = any(np.array_equal(image[t:t + 8, l:l + 12], crop)
              for t in range(13) for l in range(19))
  assert found
  with pytest.raises(ValueError, match="smaller"):
    run("central_crop(40)", {"image": image})


def coordinate_image(h, w):
  """[h, w, 3] uint8 whose pixel (y, x) is (y, x, 0): a crop shows which window it is."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def crop_box(image, crop):
  """(top, left, h, w) of `crop`, checked to be that window of `image`."""
  top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
  h, w = crop.shape[:2]
  np.testing.assert_array_equal(crop, image[top:top + h, left:left + w])
  return top, left, h, w


@pytest.mark.parametrize("area_min,area_max", [(5, 100), (50, 60)])
def test_inception_crop_boxes_are_random_with_area_and_aspect_in_range(area_min, area_max):
  height, width = 40, 60
  image = coordinate_image(height, width)
  op = f"inception_crop(area_min={area_min}, area_max={area_max})"
  boxes = [crop_box(image, run(op, {"image": image}, seed)["image"]) for seed in range(100)]
  crops = [b for b in boxes if b != (0, 0, height, width)]  # The rest: the op's fallback.
  assert len(crops) >= 80, len(crops)
  for _, _, h, w in crops:
    # h and w are rounded to pixels: some (h', w') within 1/2 of them has area in
    # [area_min, area_max] % of the image and aspect w'/h' in [3/4, 4/3].
    assert (h + 0.5) * (w + 0.5) >= area_min / 100 * height * width, (h, w)
    assert (h - 0.5) * (w - 0.5) <= area_max / 100 * height * width, (h, w)
    assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3, (h, w)
  # Random boxes: many different ones, placed anywhere, areas and aspects spread out.
  assert len(set(crops)) >= 60
  assert any(t > 0 for t, _, _, _ in crops) and any(l > 0 for _, l, _, _ in crops)
  assert sum(abs(2 * l + w - width) > 1 for _, l, _, w in crops) >= 50  # Not centred.
  areas = [h * w / (height * width) for _, _, h, w in crops]
  aspects = [w / h for _, _, h, w in crops]
  spread = (area_max - area_min) / 100
  assert max(areas) - min(areas) >= 0.6 * spread, (min(areas), max(areas))
  assert min(aspects) < 0.9 and max(aspects) > 1.1, (min(aspects), max(aspects))


def test_inception_crop_resizes_its_box_and_repeats_per_seed():
  image = coordinate_image(40, 60)
  for seed in range(5):
    top, left, h, w = crop_box(image, run("inception_crop()", {"image": image}, seed)["image"])
    resized = run("inception_crop(16)", {"image": image}, seed)["image"]
    want = Image.fromarray(image[top:top + h, left:left + w]).resize((16, 16),
                                                                      Image.BILINEAR)
    np.testing.assert_array_equal(resized, np.asarray(want))
    np.testing.assert_array_equal(run("inception_crop(16)", {"image": image}, seed)["image"],
                                  resized)


def test_resize_and_resize_small():
  image = random_image(20, 30)
  out = run("resize((10, 15), method='nearest')", {"image": image})["image"]
  np.testing.assert_array_equal(out, image[1::2, 1::2])  # PIL nearest samples centres.
  assert run("resize_small(10)", {"image": image})["image"].shape == (10, 15, 3)
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(run("resize(5)", {"image": flat})["image"], 77)
  floats = np.full((8, 8, 3), 0.25, np.float32)
  np.testing.assert_allclose(run("resize(4)", {"image": floats})["image"], 0.25, rtol=1e-6)


def test_keep_drop_copy():
  ex = {"image": 1, "label": 2, "caption": b"x"}
  assert run('keep("image", "label")', ex) == {"image": 1, "label": 2}
  assert run('drop("caption")', ex) == {"image": 1, "label": 2}
  assert run('copy("label", "y")', ex)["y"] == 2
  with pytest.raises(ValueError, match=r"keys \['labels'\] are not in the example"):
    run('keep("labels")', ex)


def test_resize_methods_and_antialiasing():
  stripes = np.zeros((8, 8, 3), np.uint8)
  stripes[:, ::2] = 255  # Alternating columns: mean 127.5.
  area = run("resize((8, 4), method='area')", {"image": stripes})["image"]
  np.testing.assert_array_equal(area, np.full((8, 4, 3), 128))  # Box filter = 2x2 means.
  bilinear = run("resize(4)", {"image": stripes})["image"]
  assert np.abs(bilinear.astype(float) - 127.5).max() < 40  # Antialiased when shrinking.
  nearest = run("resize(4, method='nearest')", {"image": stripes})["image"]
  assert set(np.unique(nearest)) <= {0, 255}
  with pytest.raises(ValueError, match=r"method must be one of nearest, bilinear, .*; got "
                     r"'cubic'"):
    pp.get_preprocess_fn("resize(4, method='cubic')")


def test_split_respects_strings_and_brackets():
  ex = {"a|b": 1, "x": 2}
  assert run('keep("a|b")', ex) == {"a|b": 1}
  assert run('copy("a|b", "c") | keep("c", "x")', ex) == {"c": 1, "x": 2}
  assert run("", ex) == ex


def test_validate_checks_names_and_arguments_without_running():
  pp.validate('decode|resize(48)|flip_lr|value_range(-1, 1)|onehot(10, key="label", '
              'key_result="labels")|keep("image", "labels")')
  with pytest.raises(ValueError, match=r"pp op 'onehot\(\)': bad arguments for onehot\("):
    pp.validate("decode|onehot()")


@pytest.mark.parametrize("pp_string,message", [
    ("decode|blur(3)", r"Unknown pp op 'blur'; known: .*central_crop.*value_range"),
    ("decode|resize(48", r"pp op 'resize\(48' is not of the form name"),
    ("resize(size)", r"pp op 'resize\(size\)': arguments must be Python literals"),
    ("resize(4 + x)", r"arguments must be Python literals"),
    ("os.system('x')", r"pp op \"os.system\('x'\)\" is not of the form name"),
    ("resize(**{'size': 4})", r"not of the form name"),
    ("resize(48, colour=1)", r"pp op 'resize\(48, colour=1\)': bad arguments"),
    ("decode||flip_lr", r"has an empty op"),
])
def test_bad_pp_strings(pp_string, message):
  with pytest.raises(ValueError, match=message):
    pp.validate(pp_string)
  with pytest.raises(ValueError, match=message):
    pp.get_preprocess_fn(pp_string)
