"""DINO's multi-crop pp ops against PIL, colorsys, torchvision and closed forms."""
import colorsys
import copy
import io

import numpy as np
import pytest
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter

from big_vision_lite.input import pp
from test_pp import random_image, run  # pylint: disable=g-bad-import-order

LUMA = np.array([0.299, 0.587, 0.114])




def test_random_grayscale_is_the_601_luma():
  image = random_image(12, 16)
  out = run("random_grayscale(p=1.0)", {"image": image})["image"]
  want = np.rint(image.astype(np.float64) @ LUMA)  # [H, W]
  assert out.dtype == np.uint8 and out.shape == image.shape
  for channel in range(3):
    np.testing.assert_array_equal(out[..., channel], want)
  pil = np.asarray(Image.fromarray(image).convert("L")).astype(int)  # PIL's fixed point.
  assert np.abs(out[..., 0].astype(int) - pil).max() <= 1
  np.testing.assert_array_equal(run("random_grayscale(p=0.0)", {"image": image})["image"], image)


def test_solarize_inverts_pixels_at_or_above_the_threshold():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  values = np.arange(256)
  for threshold in (128, 200):
    out = run(f"solarize(1.0, threshold={threshold})", {"image": image})["image"]
    want = np.where(values < threshold, values, 255 - values)
    np.testing.assert_array_equal(out[..., 1].ravel(), want)
    assert out.dtype == np.uint8
  np.testing.assert_array_equal(run("solarize(0.0)", {"image": image})["image"], image)


def test_random_invert_is_255_minus_every_pixel():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = run("random_invert(1.0)", {"image": image})["image"]
  np.testing.assert_array_equal(out[..., 2].ravel(), 255 - np.arange(256))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(run("random_invert(0.0)", {"image": image})["image"], image)


def test_gaussian_blur_is_pils_with_a_uniform_sigma():
  image = random_image(24, 24)
  for seed in range(3):
    rng = np.random.default_rng(seed)
    twin = copy.deepcopy(rng)
    out = pp.get_preprocess_fn("gaussian_blur(1.0, 0.5, 3.0)")({"image": image}, rng)["image"]
    twin.random()  # The draw for p.
    sigma = twin.uniform(0.5, 3.0)
    want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
    np.testing.assert_array_equal(out, want)
    assert out.std() < 0.8 * image.std()  # A real blur.
  fixed = run("gaussian_blur(1.0, 1.5, 1.5)", {"image": image})["image"]
  want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1.5)))
  np.testing.assert_array_equal(fixed, want)
  np.testing.assert_array_equal(run("gaussian_blur(0.0)", {"image": image})["image"], image)


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.4, 2.0])
def test_brightness_contrast_saturation_match_pil(factor):
  image = random_image(12, 16)
  image[..., 2] = image[..., 2] // 4 + 192  # A blue cast: luma and channel means differ.
  pil = Image.fromarray(image)
  references = {pp.adjust_brightness: ImageEnhance.Brightness,
                pp.adjust_contrast: ImageEnhance.Contrast,
                pp.adjust_saturation: ImageEnhance.Color}
  for adjust, enhancer in references.items():
    out = adjust(image, factor)
    want = np.asarray(enhancer(pil).enhance(factor)).astype(int)
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - want).max() <= 1, (adjust.__name__, factor)
  closed_form = np.clip(np.rint(image * factor), 0, 255)  # Brightness: blend with black.
  np.testing.assert_array_equal(pp.adjust_brightness(image, factor), closed_form)


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.05, 0.3])
def test_hue_matches_colorsys(shift):
  image = random_image(12, 16)
  image[0, :3] = [[40, 40, 40], [255, 0, 0], [0, 0, 0]]  # Gray, pure red, black.
  want = np.zeros(image.shape)
  for (y, x), _ in np.ndenumerate(image[..., 0]):
    h, s, v = colorsys.rgb_to_hsv(*(image[y, x] / 255))
    want[y, x] = colorsys.hsv_to_rgb((h + shift) % 1, s, v)
  out = pp.adjust_hue(image, shift)
  assert out.dtype == np.uint8
  assert np.abs(out.astype(int) - np.rint(want * 255)).max() <= 1


def test_adjustments_match_torchvision():
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("torchvision.transforms.functional")
  image = random_image(20, 30)
  image[..., 2] = image[..., 2] // 4 + 192  # A blue cast: luma and channel means differ.
  tensor = torch.from_numpy(image).permute(2, 0, 1)  # [3, H, W] uint8
  cases = [("brightness", f) for f in (0.0, 0.6, 1.4)] + [
      ("contrast", f) for f in (0.0, 0.6, 1.4)] + [
          ("saturation", f) for f in (0.0, 0.8, 1.2)] + [
              ("hue", f) for f in (-0.5, -0.1, 0.1, 0.5)]
  for name, factor in cases:
    want = getattr(functional, f"adjust_{name}")(tensor, factor).permute(1, 2, 0).numpy()
    out = getattr(pp, f"adjust_{name}")(image, factor)
    # torchvision truncates to uint8, we round: at most one level apart.
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 1, (name, factor)


def test_color_jitter_applies_the_four_in_the_drawn_order():
  image = random_image(12, 16)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    twin = copy.deepcopy(rng)
    out = pp.get_preprocess_fn("color_jitter(0.4, 0.4, 0.2, 0.1, p=1.0)")(
        {"image": image}, rng)["image"]
    twin.random()
    order = twin.permutation(4)
    factors = [twin.uniform(0.6, 1.4), twin.uniform(0.6, 1.4), twin.uniform(0.8, 1.2),
               twin.uniform(-0.1, 0.1)]
    adjust = [pp.adjust_brightness, pp.adjust_contrast, pp.adjust_saturation, pp.adjust_hue]
    want = image
    for i in order:
      want = adjust[i](want, factors[i])
    np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(run("color_jitter(p=0.0)", {"image": image})["image"], image)


def test_color_jitter_factors_are_uniform_in_their_ranges():
  gray = np.full((1, 1, 3), 100, np.uint8)
  brightness = np.array([run("color_jitter(0.4, 0, 0, 0, p=1.0)", {"image": gray}, seed)
                         ["image"][0, 0, 0] / 100 for seed in range(300)])
  assert 0.6 - 0.01 <= brightness.min() < 0.65 and 1.35 < brightness.max() <= 1.4 + 0.01
  assert abs(brightness.mean() - 1) < 4 * 0.8 / np.sqrt(12 * 300)
  red = np.array([[[255, 0, 0]]], np.uint8)
  shifts = []
  for seed in range(300):
    r, g, b = run("color_jitter(0, 0, 0, 0.1, p=1.0)", {"image": red}, seed)["image"][0, 0]
    hue = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0]
    shifts.append((hue + 0.5) % 1 - 0.5)
  assert -0.1 - 0.005 <= min(shifts) < -0.09 and 0.09 < max(shifts) <= 0.1 + 0.005


@pytest.mark.parametrize("op,p", [("random_grayscale(p={p})", 0.2), ("solarize({p})", 0.2),
                                  ("color_jitter(p={p})", 0.8), ("random_invert({p})", 0.5),
                                  ("gaussian_blur({p}, 1.0, 2.0)", 0.5)])
def test_ops_apply_with_probability_p(op, p):
  image = np.array([[[200, 30, 150], [0, 255, 140]], [[130, 60, 10], [250, 250, 0]]], np.uint8)
  fn = pp.get_preprocess_fn(op.format(p=p))
  rng = np.random.default_rng(0)
  draws = 2000
  applied = sum(not np.array_equal(fn({"image": image}, rng)["image"], image)
                for _ in range(draws))
  assert abs(applied / draws - p) <= 4 * np.sqrt(p * (1 - p) / draws), applied / draws


def test_colour_ops_reject_float_images():
  image = np.zeros((4, 4, 3), np.float32)
  for op in ("color_jitter", "random_grayscale", "gaussian_blur(0.5)", "solarize(0.5)",
             "random_invert", "multicrop(8, 4, 1)"):
    with pytest.raises(ValueError, match=r"'image' must be a uint8 image \(apply it before "
                       r"value_range\), got dtype float32"):
      run(op, {"image": image})


@pytest.mark.parametrize("area_min,area_max", [(5, 40), (40, 100)])
def test_inception_box_areas_are_uniform_fractions_with_bounded_aspect(area_min, area_max):
  rng = np.random.default_rng(0)
  height, width = 100, 120
  boxes = [pp.inception_box(height, width, area_min, area_max, rng) for _ in range(2000)]
  for top, left, h, w in boxes:
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
  boxes = [b for b in boxes if b != (0, 0, height, width)]  # The rest: fallbacks.
  assert len(boxes) > 1900
  h, w = np.array([b[2:] for b in boxes], float).T
  # Pixel rounding: some (h', w') within 1/2 of (h, w) meets the bounds.
  assert np.all((h + 0.5) * (w + 0.5) >= area_min / 100 * height * width)
  assert np.all((h - 0.5) * (w - 0.5) <= area_max / 100 * height * width)
  assert np.all((w + 0.5) / (h - 0.5) >= 3 / 4) and np.all((w - 0.5) / (h + 0.5) <= 4 / 3)
  fraction = h * w / (height * width)
  low, high = area_min / 100, area_max / 100
  if area_max <= 40:  # No box misfits, so the fraction is uniform in [low, high].
    assert abs(fraction.mean() - (low + high) / 2) < 4 * (high - low) / np.sqrt(12 * 2000) + 0.002
    assert abs(np.mean(fraction < (low + high) / 2) - 0.5) < 4 * 0.5 / np.sqrt(2000)
  assert fraction.min() < low + 0.05 * (high - low) and fraction.max() > high - 0.05 * (
      high - low)
  # No box of that area fits a 1-pixel-high strip: the whole strip is the fallback.
  assert pp.inception_box(1, 100, area_min, area_max, rng) == (0, 0, 1, 100)


def test_multicrop_shapes_dtypes_and_ranges():
  example = {"image": random_image(40, 56), "label": 3}
  out = run("multicrop(32, 16, 4)", example)
  assert sorted(out) == ["global_crops", "label", "local_crops"] and out["label"] == 3
  assert out["global_crops"].shape == (2, 32, 32, 3) and out["global_crops"].dtype == np.float32
  assert out["local_crops"].shape == (4, 16, 16, 3) and out["local_crops"].dtype == np.float32
  for crops in (out["global_crops"], out["local_crops"]):
    assert crops.min() >= -1 and crops.max() <= 1 and crops.min() < 0 < crops.max()
  none = run("multicrop(24, 8, 0, vmin=0, vmax=1)", example)
  assert none["local_crops"].shape == (0, 8, 8, 3) and none["local_crops"].dtype == np.float32
  assert none["global_crops"].shape == (2, 24, 24, 3)
  assert none["global_crops"].min() >= 0 and none["global_crops"].max() <= 1


def test_multicrop_is_the_documented_chain_of_ops():
  image = random_image(40, 56)
  for seed, jitter, grayscale_p, invert_p in ((0, None, None, 0), (1, None, None, 0),
                                              (2, (0.8, 0.8, 0.8, 0.5), 0.5, 0.5)):
    options = ("" if jitter is None
               else f", jitter={jitter}, grayscale_p={grayscale_p}, invert_p={invert_p}")
    out = run("multicrop(24, 12, 3, global_scale=(0.5, 0.9), local_scale=(0.1, 0.3)"
              f"{options})", {"image": image}, seed)
    jitter_op = "color_jitter" if jitter is None else f"color_jitter{jitter}"
    grayscale_op = ("random_grayscale" if grayscale_p is None
                    else f"random_grayscale({grayscale_p})")
    invert_op = f"|random_invert({invert_p})" if invert_p else ""
    tail = f"|flip_lr|{jitter_op}|{grayscale_op}{invert_op}|gaussian_blur({{}})"
    chains = [f"inception_crop(24, 50, 90, method='bicubic'){tail.format(1.0)}",
              f"inception_crop(24, 50, 90, method='bicubic'){tail.format(0.1)}|solarize(0.2)"
              ] + [f"inception_crop(12, 10, 30, method='bicubic'){tail.format(0.5)}"] * 3
    rng = np.random.default_rng(seed)
    crops = [pp.get_preprocess_fn(chain + "|value_range(-1, 1)")({"image": image}, rng)["image"]
             for chain in chains]
    np.testing.assert_array_equal(out["global_crops"], np.stack(crops[:2]))
    np.testing.assert_array_equal(out["local_crops"], np.stack(crops[2:]))


def test_multicrop_box_areas_are_within_the_scales(monkeypatch):
  calls = []

  def recording_box(height, width, area_min, area_max, rng):
    box = inception_box(height, width, area_min, area_max, rng)
    calls.append((area_min, area_max, box[2] * box[3] / (height * width)))
    return box
  inception_box = pp.inception_box
  monkeypatch.setattr(pp, "inception_box", recording_box)
  fn = pp.get_preprocess_fn("multicrop(16, 8, 3)")
  rng = np.random.default_rng(0)
  for _ in range(100):
    fn({"image": random_image(60, 80)}, rng)
  assert len(calls) == 100 * 5
  scales = {"global": (0.4, 1.0), "local": (0.05, 0.4)}
  for kind, calls_of_kind in (("global", calls[0::5] + calls[1::5]),
                              ("local", calls[2::5] + calls[3::5] + calls[4::5])):
    low, high = scales[kind]
    area_bounds = np.array([(a, b) for a, b, _ in calls_of_kind])  # In percent.
    np.testing.assert_allclose(area_bounds, np.broadcast_to([100 * low, 100 * high],
                                                            area_bounds.shape))
    fractions = np.array([f for _, _, f in calls_of_kind])
    assert np.all(fractions >= 0.9 * low) and np.all(fractions <= 1.1 * high), kind
    # Spread over the range (boxes near the whole image fit only at the image's aspect).
    assert fractions.min() < low + 0.1 * (high - low), kind
    assert fractions.max() > high - 0.25 * (high - low), kind


def test_multicrop_repeats_per_seed_and_differs_across_seeds():
  example = {"image": random_image(40, 56)}
  a, b, c = (run("multicrop(16, 8, 2)", example, seed) for seed in (5, 5, 6))
  for key in ("global_crops", "local_crops"):
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
  assert not np.array_equal(a["global_crops"][0], a["global_crops"][1])


@pytest.mark.parametrize("op,message", [
    ("multicrop(0, 8, 2)", r"global_size must be an int > 0; got 0"),
    ("multicrop(16, -1, 2)", r"local_size must be an int > 0; got -1"),
    ("multicrop(16, 8, -1)", r"num_local must be an int >= 0; got -1"),
    ("multicrop(16, 8, 2.5)", r"num_local must be an int >= 0; got 2.5"),
    ("multicrop(16, 8, 2, global_scale=(40, 100))",
     r"global_scale must be \(min, max\) area fractions with 0 < min <= max <= 1; got \(40, 100\)"),
    ("multicrop(16, 8, 2, local_scale=(0.4, 0.05))", r"local_scale must be .*got \(0.4, 0.05\)"),
    ("multicrop(16, 8, 2, local_scale=(0, 0.4))", r"local_scale must be .*got \(0, 0.4\)"),
    ("multicrop(16, 8, 2, blur_sigma=(2, 1))", r"blur_sigma must be \(min, max\) in pixels"),
    ("multicrop(16, 8, 2, method='cubic')", r"method must be one of"),
    ("multicrop(16, 8, 2, jitter=(0.4, 0.4))", r"jitter must be \(brightness, contrast, "),
    ("multicrop(16, 8, 2, jitter=(0.4, 0.4, 0.2, 0.7))", r"hue must be a number in \[0, 0.5\]"),
    ("multicrop(16, 8, 2, grayscale_p=1.5)", r"random_grayscale: p must be"),
    ("multicrop(16, 8, 2, invert_p=1.5)", r"random_invert: p must be a probability in \[0, 1\]"),
    ("color_jitter(p=1.5)", r"color_jitter: p must be a probability in \[0, 1\]; got 1.5"),
    ("color_jitter(brightness=-0.1)", r"brightness must be a number >= 0; got -0.1"),
    ("color_jitter(hue=0.6)", r"hue must be a number in \[0, 0.5\]; got 0.6"),
    ("random_grayscale(p=-0.1)", r"random_grayscale: p must be a probability in \[0, 1\]"),
    ("gaussian_blur(2)", r"gaussian_blur: p must be a probability in \[0, 1\]; got 2"),
    ("gaussian_blur(0.5, 2.0, 1.0)", r"0 <= sigma_min <= sigma_max; got 2.0, 1.0"),
    ("solarize(0.5, threshold=300)", r"threshold must be a number in \[0, 256\]; got 300"),
])
def test_bad_arguments_fail_when_the_ops_are_built(op, message):
  with pytest.raises(ValueError, match=message):
    pp.get_preprocess_fn(op)  # Built, not run on any example.


def test_multicrop_in_a_pp_string_and_the_train_iterator(tmp_path):
  data = pytest.importorskip("big_vision_lite.input.data")
  shapes = pytest.importorskip("big_vision_lite.input.shapes")
  png = io.BytesIO()
  Image.fromarray(random_image(30, 40)).save(png, format="PNG")
  pp_string = 'decode|multicrop(32, 16, 4)|keep("global_crops", "local_crops")'
  out = run(pp_string, {"image": png.getvalue(), "label": 1})
  assert sorted(out) == ["global_crops", "local_crops"]
  assert out["global_crops"].shape == (2, 32, 32, 3) and out["local_crops"].shape == (4, 16, 16, 3)
  spec = dict(name="shapes/tiny", split="train",
              data_dir=shapes.ensure_built(str(tmp_path), "tiny"))
  batch = next(data.make_train_iterator(spec, pp_string, 4, seed=0))
  assert sorted(batch) == ["global_crops", "local_crops"]
  assert batch["global_crops"].shape == (4, 2, 32, 32, 3)
  assert batch["local_crops"].shape == (4, 4, 16, 16, 3)
  assert batch["global_crops"].dtype == np.float32
  assert np.abs(batch["global_crops"]).max() <= 1
