"""Tokenizers (bytes, sentencepiece) and the text pp ops `tokenize` and `choose`, against
Python's own UTF-8 encoding, sentencepiece's own ids and direct counting."""
import collections
import itertools

import numpy as np
import pytest
import sentencepiece

from big_vision_lite.input import pp
from big_vision_lite.input import shapes
from big_vision_lite.input import tokenizers

UNICODE = "café 東京 🙂"


def shapes_captions() -> list[str]:
  """Captions in the style of the shapes dataset (its words, its grammar)."""
  combos = itertools.product(shapes.COLORS, shapes.CLASSES, list(shapes.COLORS)[::3],
                             shapes.CLASSES[::4])
  return [f"a large {c} {s}, a small {c2} {s2} on a blotchy background"
          for c, s, c2, s2 in itertools.islice(combos, 0, None, 7)]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
  """Two tiny sentencepiece models trained on shapes captions (~0.1 s): sentencepiece's
  default ids (unk 0, bos 1, eos 2, no pad) and T5-style ids (pad 0, unk 1, eos 2)."""
  out = tmp_path_factory.mktemp("spm")
  common = dict(vocab_size=48, minloglevel=2)
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(shapes_captions()),
                                           model_prefix=str(out / "default"), **common)
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(shapes_captions()),
                                           model_prefix=str(out / "t5"), pad_id=0, unk_id=1,
                                           bos_id=-1, eos_id=2, **common)
  return {"default": str(out / "default.model"), "t5": str(out / "t5.model")}


def test_bytes_round_trips_unicode_and_matches_utf8():
  tok = tokenizers.get("bytes")
  texts = [UNICODE, UNICODE.encode(), "", "a large red star"]
  ids = tok.encode(texts, 24)
  assert ids.dtype == np.int32 and ids.shape == (4, 24)
  assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)
  for text, row in zip(texts, ids):
    raw = text.encode() if isinstance(text, str) else text
    want = [b + 2 for b in raw] + [1] + [0] * (24 - len(raw) - 1)
    assert row.tolist() == want
    assert tok.decode(row) == raw.decode()
  assert len(UNICODE.encode()) == 17  # 4 + 1 + 6 + 1 + 4 + 1 (the EOS fits in 24).


def test_bytes_truncation_keeps_the_eos():
  tok = tokenizers.get("bytes")
  ids = tok.encode(["abcdef", "ab"], 4)
  assert ids.tolist() == [[99, 100, 101, 1], [99, 100, 1, 0]]
  assert tok.encode(["abc"], 1).tolist() == [[1]]
  assert tok.decode(ids[0]) == "abc"
  # A cut inside a multi-byte character decodes to U+FFFD, never raises.
  assert tok.decode(tok.encode(["é"], 2)[0]) == "\ufffd"


@pytest.mark.parametrize("kind,shift", [("default", 1), ("t5", 0)])
def test_sentencepiece_ids_are_the_models_own_shifted_off_padding(spm_models, kind, shift):
  path = spm_models[kind]
  model = sentencepiece.SentencePieceProcessor(model_file=path)
  tok = tokenizers.get(f"sentencepiece:{path}")
  assert tok.pad_id == 0
  assert tok.eos_id == model.eos_id() + shift
  assert tok.vocab_size == model.get_piece_size() + shift
  texts = ["a large red star on a blotchy background", b"a small blue ring"]
  ids = tok.encode(texts, 16)
  for text, row in zip(texts, ids):
    pieces = [p + shift for p in model.encode(text if isinstance(text, str) else text.decode())]
    want = (pieces[:15] + [tok.eos_id] + [0] * 16)[:16]
    assert row.tolist() == want
  assert 0 not in ids[0] and 0 not in ids[1][:len(model.encode("a small blue ring")) + 1]
  assert tok.decode(ids[1]) == "a small blue ring"


@pytest.mark.parametrize("spec,error", [
    ("byte", r"Unknown tokenizer spec 'byte'; accepted: 'bytes' or 'sentencepiece:"),
    ("sentencepiece:", r"Unknown tokenizer spec 'sentencepiece:'; accepted"),
    (None, r"Unknown tokenizer spec None; accepted"),
    ("sentencepiece:/no/such.model", r"sentencepiece:/no/such.model': no such file")])
def test_unknown_spec_names_the_accepted_forms(spec, error):
  with pytest.raises(ValueError, match=error):
    tokenizers.get(spec)


def test_max_len_below_one_and_non_text_raise():
  tok = tokenizers.get("bytes")
  with pytest.raises(ValueError, match="max_len must be an int >= 1"):
    tok.encode(["a"], 0)
  with pytest.raises(ValueError, match="wrap it in a list"):
    tok.encode("a", 4)
  with pytest.raises(ValueError, match="str or bytes texts, got int"):
    tok.encode([3], 4)


def run(pp_string, example, seed=0):
  return pp.get_preprocess_fn(pp_string)(example, np.random.default_rng(seed))


def test_tokenize_op_one_text_and_a_list():
  tok = tokenizers.get("bytes")
  one = run('tokenize(12, inkey="caption")|keep("text")', {"caption": b"a red star"})
  np.testing.assert_array_equal(one["text"], tok.encode(["a red star"], 12)[0])
  assert one["text"].shape == (12,) and one["text"].dtype == np.int32
  # tfds decodes a Text feature of a Sequence as an object array of bytes.
  texts = np.array([b"a", UNICODE.encode(), b"b c"], dtype=object)
  many = run("tokenize(20)", {"text": texts})["text"]
  assert many.shape == (3, 20)
  assert [tok.decode(r) for r in many] == ["a", UNICODE, "b c"]


def test_tokenize_with_sentencepiece_equals_the_tokenizer(spm_models):
  spec = f"sentencepiece:{spm_models['default']}"
  got = run(f'tokenize(10, tokenizer="{spec}", inkey="caption")', {"caption": b"a large ring"})
  np.testing.assert_array_equal(got["text"], tokenizers.get(spec).encode(["a large ring"],
                                                                          10)[0])


COCO_LIKE = {"image": np.zeros((2, 2, 3), np.uint8),
             "captions": {"id": np.arange(5), "text": np.array(
                 [b"c0", b"c1", b"c2", b"c3", b"c4"], dtype=object)}}


def test_choose_k_distinct_captions_deterministic_per_rng():
  seen = collections.Counter()
  for seed in range(200):
    got = run("choose(3)", COCO_LIKE, seed)["text"]
    assert len(got) == 3 and len(set(got)) == 3 and set(got) <= set(COCO_LIKE["captions"]["text"])
    assert run("choose(3)", COCO_LIKE, seed)["text"] == got  # The same rng, the same choice.
    seen.update(got)
  assert set(seen) == set(COCO_LIKE["captions"]["text"])
  assert min(seen.values()) > 90  # Each caption in 3/5 of 200 draws (sd ~7).
  firsts = {run("choose(1)", COCO_LIKE, seed)["text"] for seed in range(40)}
  assert firsts == set(COCO_LIKE["captions"]["text"])  # k = 1: one text, any of them.


def test_choose_from_fewer_captions_keeps_all_then_repeats():
  one = run('choose(4, inkey="caption")', {"caption": b"only"})["text"]
  assert one == [b"only"] * 4
  for seed in range(20):
    got = run('choose(5, inkey="caps")', {"caps": [b"x", b"y"]}, seed)["text"]
    assert len(got) == 5 and set(got[:2]) == {b"x", b"y"}
  batch = run('choose(5, inkey="caps")|tokenize(4)', {"caps": [b"x", b"y"]})["text"]
  assert batch.shape == (5, 4)


@pytest.mark.parametrize("pp_string,example,error", [
    ('choose(2, inkey="captions")', COCO_LIKE, r"pp op choose: inkey 'captions' must hold a "
     r"str/bytes text or a list of them; got dict \(a dict: name its text field, e\.g\. "
     r"inkey='captions/text'\)"),
    ('choose(2, inkey="captions/txt")', COCO_LIKE, r"pp op choose: inkey 'captions/txt': no "
     r"key 'txt'"),
    ("tokenize(4)", {"caption": b"a"}, r"pp op tokenize: inkey 'text': no key 'text'"),
    ('tokenize(4, inkey="n")', {"n": 3}, r"pp op tokenize: inkey 'n' must hold a str/bytes"),
    ('tokenize(4, inkey="n")', {"n": []}, r"pp op tokenize: inkey 'n' holds an empty list"),
    ('choose(2, inkey="n")', {"n": []}, r"pp op choose: inkey 'n' holds no texts")])
def test_text_ops_name_the_op_and_key_on_bad_examples(pp_string, example, error):
  with pytest.raises(ValueError, match=error):
    run(pp_string, example)


@pytest.mark.parametrize("pp_string,error", [
    ("tokenize(0)", r"pp op tokenize: max_len must be an int > 0; got 0"),
    ('tokenize(8, tokenizer="spm")', r"pp op tokenize: tokenizer: Unknown tokenizer spec "
     r"'spm'; accepted: 'bytes' or 'sentencepiece:"),
    ('tokenize(8, outkey="a/b")', r"pp op tokenize: outkey must be a top-level key"),
    ('choose(k=2.0)', r"pp op choose: k must be an int > 0; got 2.0"),
    ('choose(2, inkey="captions//text")', r"pp op choose: inkey must be a key, or 'a/b'")])
def test_bad_op_arguments_fail_at_validation(pp_string, error):
  with pytest.raises(ValueError, match=error):
    pp.validate(pp_string)


def test_shapes_captions_batch_as_tokens():
  """The embedded dataset's captions through the eval iterator: [B, L] int32 rows that
  decode to the stored captions."""
  from big_vision_lite.input import data as data_lib  # pylint: disable=g-import-not-at-top
  split = dict(name="shapes/tiny", split="test[:8]")
  batch = next(data_lib.make_eval_iterator(
      split, 'tokenize(128, inkey="caption")|keep("label", "text")', 8))
  assert batch["text"].shape == (8, 128) and batch["text"].dtype == np.int32
  source = data_lib.get_source(split)
  tok = tokenizers.get("bytes")
  assert [tok.decode(r) for r in batch["text"]] == [source[i]["caption"].decode()
                                                    for i in range(8)]
