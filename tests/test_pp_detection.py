"""Detection pp ops: boxes against the pixels they cover, closed forms, padding, errors, and
a DETR pp string through the train and eval iterators on the tiny shapes dataset."""
import numpy as np
import pytest

from big_vision_lite.input import data
from big_vision_lite.input import pp
from big_vision_lite.input import shapes

MAX_BOXES = 4
SIZE = 64
KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask", "orig_size")
_TAIL = f'normalize|to_cxcywh|pad_boxes({MAX_BOXES})|pad_image({SIZE})|keep{KEYS}'
TRAIN_PP = ('decode|orig_size|filter_objects|flip_lr|random_select('
            '"random_resize([32, 40, 48], max_size=64)", "random_resize([32, 40, 48])|'
            'random_size_crop(24, 48)|random_resize([32, 40, 48], max_size=64)")|' + _TAIL)
EVAL_PP = 'decode|orig_size|random_resize(40, max_size=64)|' + _TAIL
_SCALES = list(range(480, 801, 32))
COCO_TRAIN_PP = (  # DETR's: flip, then resize, or resize-crop-resize; at most 1333 px.
    f'decode|orig_size|filter_objects|flip_lr|random_select('
    f'"random_resize({_SCALES}, max_size=1333)", "random_resize([400, 500, 600])|'
    f'random_size_crop(384, 600)|random_resize({_SCALES}, max_size=1333)")|normalize|'
    f'to_cxcywh|pad_boxes(100)|pad_image(1333)|keep{KEYS}')
COCO_EVAL_PP = (  # Crowd boxes and COCO's areas kept for COCOeval.
    'decode|orig_size|random_resize(800, max_size=1333)|normalize|to_cxcywh|pad_boxes(100)|'
    f'pad_image(1333)|keep{KEYS + ("is_crowd", "area")}')
FIRST_MARK = 251  # Random pixels are < FIRST_MARK; box k is filled with FIRST_MARK + k.


def run(pp_string, example, seed=0):
  return pp.get_preprocess_fn(pp_string)(example, np.random.default_rng(seed))


def boxed_example(h, w, pixel_boxes, seed=0):
  """A random [h, w, 3] image with box k = (top, left, bottom, right) (pixels, exclusive
  ends) filled with FIRST_MARK + k; objects: its tfds bbox, label k, id 10 k, is_crowd."""
  image = np.random.default_rng(seed).integers(0, FIRST_MARK, (h, w, 3), dtype=np.uint8)
  for k, (top, left, bottom, right) in enumerate(pixel_boxes):
    image[top:bottom, left:right] = FIRST_MARK + k
  bbox = np.asarray(pixel_boxes, np.float64).reshape(-1, 4) / [h, w, h, w]
  n = len(pixel_boxes)
  objects = {"bbox": bbox.astype(np.float32), "label": np.arange(n), "id": 10 * np.arange(n),
             "is_crowd": np.zeros(n, bool)}
  return {"image": image, "objects": objects}


def boxes_from_pixels(image):
  """{k: normalised (ymin, xmin, ymax, xmax) of the pixels marked FIRST_MARK + k}."""
  h, w = image.shape[:2]
  found = {}
  for k in range(256 - FIRST_MARK):
    ys, xs = np.nonzero((image == FIRST_MARK + k).all(-1))
    if len(ys):
      found[k] = (ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w)
  return found


def check_boxes_match_pixels(out):
  """The op's objects are exactly the marked boxes left in the image, with their arrays."""
  expected = boxes_from_pixels(out["image"])
  objects = out["objects"]
  assert sorted(objects["label"].tolist()) == sorted(expected), (objects, expected)
  np.testing.assert_array_equal(objects["id"], 10 * objects["label"])
  assert len(objects["is_crowd"]) == len(objects["label"])
  for label, box in zip(objects["label"], objects["bbox"]):
    np.testing.assert_allclose(box, expected[label], atol=1e-6)
  return len(expected)


PIXEL_BOXES = [(2, 3, 9, 12), (12, 20, 20, 30), (0, 25, 4, 30)]  # In a 20 x 30 image.


def test_flip_moves_boxes_with_their_pixels():
  example = boxed_example(20, 30, PIXEL_BOXES)
  flipped = 0
  for seed in range(8):
    out = run("flip_lr", example, seed)
    check_boxes_match_pixels(out)
    flipped += not np.array_equal(out["image"], example["image"])
  assert 0 < flipped < 8


@pytest.mark.parametrize("op", ["random_size_crop(6, 25)", "random_crop((9, 14))",
                                "central_crop(12)", "inception_crop(area_min=10)"])
def test_crops_clip_boxes_and_drop_those_outside_with_their_labels(op):
  example = boxed_example(20, 30, PIXEL_BOXES)
  counts = [check_boxes_match_pixels(run(op, example, seed)) for seed in range(12)]
  if op != "central_crop(12)":  # A fixed window keeps 2 of the 3.
    assert min(counts) < len(PIXEL_BOXES) and max(counts) > 0, counts


def test_random_size_crop_sizes():
  image = np.zeros((20, 30, 3), np.uint8)
  shapes_seen = {run("random_size_crop(6, 25)", {"image": image}, seed)["image"].shape[:2]
                 for seed in range(60)}
  assert all(6 <= h <= 20 and 6 <= w <= 25 for h, w in shapes_seen)
  assert len({h for h, _ in shapes_seen}) > 5 and max(w for _, w in shapes_seen) > 20
  # A side shorter than min_size is kept whole (torchvision would raise).
  shapes_seen = {run("random_size_crop(24, 40)", {"image": image}, seed)["image"].shape[:2]
                 for seed in range(20)}
  assert {h for h, _ in shapes_seen} == {20} and {w for _, w in shapes_seen} <= set(range(24, 31))


@pytest.mark.parametrize("hw,sizes,max_size,expected", [
    ((20, 30), (10,), None, (10, 15)),
    ((20, 30), (40,), None, (40, 60)),
    ((30, 20), (40,), None, (60, 40)),
    ((20, 30), (40,), 50, (33, 49)),  # 60 > 50: short = round(50 * 20 / 30), long int(49.5).
    ((30, 20), (40,), 50, (49, 33)),
    ((20, 30), (20,), 64, (20, 30)),  # Already that size.
    ((10, 20), (15,), 23, (12, 23)),  # DETR gives long int(12 * 2) = 24 > 23: clipped.
    ((32, 65), (32,), 64, (32, 64)),  # Short side already 32, long 65 > 64: clipped.
])
def test_random_resize_closed_form(hw, sizes, max_size, expected):
  image = np.zeros(hw + (3,), np.uint8)
  out = run(f"random_resize({list(sizes)}, max_size={max_size})", {"image": image})
  assert out["image"].shape[:2] == expected


def test_random_resize_draws_each_size_and_keeps_boxes_on_their_pixels():
  example = boxed_example(20, 30, PIXEL_BOXES)
  seen = set()
  for seed in range(24):
    out = run("random_resize([20, 40, 60], method='nearest')", example, seed)
    seen.add(out["image"].shape[:2])
    check_boxes_match_pixels(out)  # Integer factors: nearest keeps the boxes' pixels.
  assert seen == {(20, 30), (40, 60), (60, 90)}


def test_to_cxcywh_closed_form():
  objects = {"bbox": np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]], np.float32),
             "label": np.array([7, 2]), "is_crowd": np.array([0, 1]), "area": np.array([5, 9]),
             "id": np.array([1, 2])}
  out = run("to_cxcywh", {"image": 1, "objects": objects})
  assert sorted(out) == ["area", "boxes", "image", "is_crowd", "labels"]
  np.testing.assert_array_equal(out["area"], np.float32([5, 9]))
  np.testing.assert_allclose(out["boxes"], [[0.55, 0.3, 0.7, 0.4], [0.5, 0.5, 1.0, 1.0]],
                             atol=1e-7)
  assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int32
  np.testing.assert_array_equal(out["labels"], [7, 2])
  np.testing.assert_array_equal(out["is_crowd"], [False, True])
  # In pixels of the current image: a box of rows 2..9, columns 8..35 of a 20 x 40 image.
  example = boxed_example(20, 40, [(2, 8, 10, 36)])
  box = run("to_cxcywh", example)["boxes"][0]
  np.testing.assert_allclose(box, [(8 + 36) / 2 / 40, (2 + 10) / 2 / 20, 28 / 40, 8 / 20],
                             atol=1e-6)
  empty = run("to_cxcywh", {"objects": {"bbox": np.zeros((0, 4)), "label": np.zeros(0)}})
  assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_pad_boxes_values_and_mask():
  example = {"boxes": np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.1]], np.float32),
             "labels": np.array([3, 9], np.int32), "is_crowd": np.array([False, True]),
             "area": np.float32([4, 5])}
  out = run("pad_boxes(4)", example)
  np.testing.assert_array_equal(out["area"], np.float32([4, 5, 0, 0]))
  np.testing.assert_array_equal(out["boxes"], np.float32([[0.5, 0.5, 0.2, 0.4],
                                                          [0.1, 0.2, 0.1, 0.1], [0] * 4, [0] * 4]))
  np.testing.assert_array_equal(out["labels"], [3, 9, 0, 0])
  np.testing.assert_array_equal(out["is_crowd"], [False, True, False, False])
  np.testing.assert_array_equal(out["box_mask"], [True, True, False, False])
  assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int32
  assert run("pad_boxes(2)", example)["box_mask"].all()
  with pytest.raises(ValueError, match=r"pad_boxes\(1\): an image has 2 boxes, more than "
                     r"max_boxes=1"):
    run("pad_boxes(1)", example)
  with pytest.raises(ValueError, match=r"pad_boxes\(4\): .*no 'boxes'.*to_cxcywh"):
    run("pad_boxes(4)", {"image": 1})


def test_pad_image_values_and_mask():
  image = np.random.default_rng(0).uniform(-1, 1, (3, 5, 3)).astype(np.float32)
  out = run("pad_image(6)", {"image": image})
  assert out["image"].shape == (6, 6, 3) and out["image"].dtype == np.float32
  np.testing.assert_array_equal(out["image"][:3, :5], image)
  assert not out["image"][3:].any() and not out["image"][:, 5:].any()
  expected_mask = np.zeros((6, 6), bool)
  expected_mask[:3, :5] = True
  np.testing.assert_array_equal(out["pixel_mask"], expected_mask)
  assert run("pad_image((4, 7))", {"image": image})["pixel_mask"].shape == (4, 7)
  with pytest.raises(ValueError, match=r"pad_image\(4\): image 'image' is 3x5 \(HxW\), "
                     r"larger than 4x4"):
    run("pad_image(4)", {"image": image})


def test_filter_objects_drops_crowd_and_empty_boxes():
  objects = {"bbox": np.array([[0, 0, .5, .5], [.2, .2, .2, .6], [0, 0, 1, 1], [.1, .1, .3, .3],
                                [.1, .5, .4, .5]]),  # 2: no height, 5: no width, 3: crowd.
             "label": np.array([1, 2, 3, 4, 5]),
             "is_crowd": np.array([False, False, True, False, False])}
  labels = lambda pp_string: run(pp_string, {"objects": objects})["objects"]["label"].tolist()
  assert labels("filter_objects") == [1, 4]
  assert labels("filter_objects(drop_crowd=False)") == [1, 3, 4]
  assert labels("filter_objects(drop_empty=False)") == [1, 2, 4, 5]
  no_crowd_key = {k: v for k, v in objects.items() if k != "is_crowd"}
  assert run("filter_objects", {"objects": no_crowd_key})["objects"]["label"].tolist() == [1, 3, 4]


def test_orig_size_and_random_select():
  image = np.zeros((20, 30, 3), np.uint8)
  out = run("orig_size|resize(8)", {"image": image})
  np.testing.assert_array_equal(out["orig_size"], [20, 30])
  assert out["orig_size"].dtype == np.int32
  select = 'random_select("resize(4)", "resize(8)|resize((8, 6))", p={})'
  assert {run(select.format(1.0), {"image": image}, s)["image"].shape for s in range(5)} == {
      (4, 4, 3)}
  assert {run(select.format(0.0), {"image": image}, s)["image"].shape for s in range(5)} == {
      (8, 6, 3)}
  assert {run(select.format(0.5), {"image": image}, s)["image"].shape for s in range(10)} == {
      (4, 4, 3), (8, 6, 3)}


def test_normalize_closed_form():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = run("normalize", {"image": image})["image"]
  expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
  np.testing.assert_allclose(out, [[expected]], rtol=1e-6)
  assert out.dtype == np.float32
  out = run("normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), in_max=1)",
            {"image": np.array([[[0.0, 0.5, 1.0]]])})["image"]
  np.testing.assert_allclose(out, [[[-1, 0, 1]]])


@pytest.mark.parametrize("pp_string,message", [
    ("random_resize([])", r"random_resize: sizes must be an int > 0 or a non-empty list"),
    ("random_resize(32, max_size=0)", r"random_resize: max_size must be an int > 0; got 0"),
    ("random_resize(32, method='cubic')", r"method must be one of nearest"),
    ("random_size_crop(10, 5)", r"random_size_crop: min_size must be <= max_size"),
    ("random_size_crop(0, 5)", r"random_size_crop: min_size must be an int > 0"),
    ("pad_boxes(0)", r"pad_boxes: max_boxes must be an int > 0; got 0"),
    ("normalize(mean=(0.5, 0.5))", r"normalize: mean must be 3 numbers \(R, G, B\)"),
    ("normalize(std=(1, 0, 1))", r"normalize: std and in_max must be > 0"),
    ("pad_image('64')", r"pad_image: size must be an int > 0 or \(height, width\)"),
    ("pad_image((64, -1))", r"pad_image: size must be an int > 0 or \(height, width\)"),
    ("filter_objects(drop_crowd=1)", r"filter_objects: drop_crowd must be True or False"),
    ("random_select('flip_lr', 'blur')", r"random_select: second 'blur': Unknown pp op 'blur'"),
    ("random_select('flip_lr', 'flip_lr', p=2)", r"random_select: p must be a probability"),
])
def test_argument_errors_at_config_time(pp_string, message):
  with pytest.raises(ValueError, match=message):
    pp.validate(pp_string)


def test_ops_on_objects_without_boxes_name_the_op():
  with pytest.raises(ValueError, match=r"pp op flip_lr: example key 'objects' must be a dict "
                     r"with 'bbox'.*got keys \['label'\]"):
    for seed in range(4):
      run("flip_lr", {"image": np.zeros((4, 4, 3), np.uint8), "objects": {"label": [1]}}, seed)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A tfds data_dir holding shapes/tiny, built once per module."""
  return shapes.ensure_built(str(tmp_path_factory.mktemp("tfds")), "tiny")


def check_contract(batch, batch_size):
  expected = {"image": ((batch_size, SIZE, SIZE, 3), np.float32),
              "pixel_mask": ((batch_size, SIZE, SIZE), bool),
              "boxes": ((batch_size, MAX_BOXES, 4), np.float32),
              "labels": ((batch_size, MAX_BOXES), np.int32),
              "box_mask": ((batch_size, MAX_BOXES), bool),
              "orig_size": ((batch_size, 2), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items() if k != "_mask"} == expected
  boxes, mask = batch["boxes"], batch["box_mask"]
  assert (boxes >= 0).all() and (boxes <= 1).all()
  corners = np.concatenate([boxes[..., :2] - boxes[..., 2:] / 2,
                            boxes[..., :2] + boxes[..., 2:] / 2], -1)  # [B, T, 4]
  assert (corners[mask] >= -1e-6).all() and (corners[mask] <= 1 + 1e-6).all()
  assert (boxes[mask][:, 2:] > 0).all() and not boxes[~mask].any()
  assert not batch["labels"][~mask].any() and (batch["labels"] < len(shapes.CLASSES)).all()
  assert not batch["image"][~batch["pixel_mask"]].any()


def test_detr_pp_through_train_and_eval_iterators(data_dir):
  pp.validate(TRAIN_PP)
  pp.validate(EVAL_PP)
  train = data.make_train_iterator(
      dict(name="shapes/tiny", split="train", data_dir=data_dir), TRAIN_PP, 8, seed=0)
  for _ in range(2):
    batch = next(train)
    check_contract(batch, 8)
    assert (batch["box_mask"].sum(1) <= 3).all() and batch["box_mask"].sum() >= 8
  spec = dict(name="shapes/tiny", split="test[:12]", data_dir=data_dir)
  source = data.get_source(spec)
  batches = list(data.make_eval_iterator(spec, EVAL_PP, 8))
  assert len(batches) == 2
  for batch in batches:
    check_contract(batch, 8)
  batch = {k: np.concatenate([b[k] for b in batches])[:12] for k in batches[0]}
  decode = pp.get_preprocess_fn("decode")
  for i in range(12):
    record = decode(source[i], None)
    height, width = record["image"].shape[:2]
    np.testing.assert_array_equal(batch["orig_size"][i], [height, width])
    h, w = pp.detr_resized_hw(height, width, 40, 64)
    assert batch["pixel_mask"][i].sum() == h * w and batch["pixel_mask"][i, h - 1, w - 1]
    n = len(record["objects"]["label"])
    assert batch["box_mask"][i].sum() == n
    np.testing.assert_array_equal(batch["labels"][i, :n], record["objects"]["label"])
    ymin, xmin, ymax, xmax = np.asarray(record["objects"]["bbox"]).T
    np.testing.assert_allclose(batch["boxes"][i, :n], np.stack(
        [(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], -1), atol=1e-6)


def test_coco_recipe_on_a_coco_like_example():
  """tfds coco/2017's features: decoded image, objects with is_crowd, area and id."""
  example = {"image": np.random.default_rng(0).integers(0, 256, (427, 640, 3), np.uint8),
             "image/id": np.int64(7),
             "objects": {"bbox": np.float32([[.1, .1, .5, .5], [.2, .3, .9, .8], [0, 0, 1, 1]]),
                         "label": np.array([4, 5, 6]), "is_crowd": np.array([False, False, True]),
                         "area": np.array([900, 4000, 200000]), "id": np.array([1, 2, 3])}}
  train = pp.get_preprocess_fn(COCO_TRAIN_PP)
  for seed in range(3):
    out = train(example, np.random.default_rng(seed))
    assert sorted(out) == sorted(KEYS) and out["image"].shape == (1333, 1333, 3)
    assert set(out["labels"][out["box_mask"]].tolist()) <= {4, 5}  # The crowd box is gone.
  out = run(COCO_EVAL_PP, example)
  np.testing.assert_array_equal(out["orig_size"], [427, 640])
  h, w = pp.detr_resized_hw(427, 640, 800, 1333)
  assert (h, w) == (800, 1199) and out["pixel_mask"].sum() == h * w
  np.testing.assert_array_equal(out["box_mask"][:4], [True, True, True, False])
  np.testing.assert_array_equal(out["is_crowd"][:4], [False, False, True, False])
  np.testing.assert_array_equal(out["area"][:4], [900, 4000, 200000, 0])
  np.testing.assert_allclose(out["boxes"][:3], [[.3, .3, .4, .4], [.55, .55, .5, .7],
                                                [.5, .5, 1, 1]], atol=1e-6)
