"""Text tokenizers, looked up by a spec string: `get("bytes")`, `get("sentencepiece:PATH")`.

Every tokenizer has `vocab_size`, `pad_id` (0), `eos_id`, `encode(texts, max_len)` ->
int32 [N, max_len] (the tokens of each text, then EOS, then padding with 0; a text too long
is truncated so that its EOS is always kept) and `decode(ids)` -> str (the tokens before the
first EOS or padding).

"bytes" (the default; needs no file): the UTF-8 bytes of a text, byte b as id b + 2
(0 = padding, 1 = EOS), so vocab_size = 258 and any unicode string round-trips. Truncation
counts bytes: it may cut a multi-byte character, which `decode` shows as U+FFFD.

"sentencepiece:PATH": a sentencepiece model file (e.g. trained with
`sentencepiece.SentencePieceTrainer`). A model whose pad id is 0 (T5's and big_vision's
vocabularies) keeps its own ids; otherwise every id is shifted up by one, so that 0 stays
free for padding. The model must define an EOS piece. Inputs that are bytes are decoded as
UTF-8 first.
"""
import functools
import os
from typing import Sequence

import numpy as np

SPECS = "'bytes' or 'sentencepiece:/path/to/model' (a sentencepiece model file)"
Text = str | bytes | np.str_ | np.bytes_


def _check_max_len(max_len: int) -> int:
  if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"Tokenizer max_len must be an int >= 1 (room for the EOS), got "
                     f"{max_len!r}.")
  return int(max_len)


def _check_texts(texts: Sequence[Text]) -> list[Text]:
  if isinstance(texts, (str, bytes, np.str_, np.bytes_)):
    raise ValueError("Tokenizer encode takes a list of texts; got a single text "
                     f"{texts!r} (wrap it in a list).")
  texts = list(texts)
  for text in texts:
    if not isinstance(text, (str, bytes, np.str_, np.bytes_)):
      raise ValueError(f"Tokenizer encode takes str or bytes texts, got "
                       f"{type(text).__name__} {text!r}.")
  return texts


def _pack(token_lists: Sequence[Sequence[int]], max_len: int, eos_id: int) -> np.ndarray:
  """[N, max_len] int32: each list truncated to max_len - 1 tokens, then EOS, then 0s."""
  out = np.zeros((len(token_lists), max_len), np.int32)
  for row, tokens in zip(out, token_lists):
    tokens = list(tokens)[:max_len - 1]
    row[:len(tokens)] = tokens
    row[len(tokens)] = eos_id
  return out


def _content(ids: Sequence[int] | np.ndarray, eos_id: int, pad_id: int) -> list[int]:
  """The ids before the first EOS or padding."""
  out = []
  for token in np.asarray(ids).reshape(-1).tolist():
    if token in (eos_id, pad_id):
      break
    out.append(token)
  return out


class ByteTokenizer:
  """UTF-8 bytes; byte b is id b + 2 (0 = padding, 1 = EOS)."""

  pad_id = 0
  eos_id = 1
  offset = 2
  vocab_size = 256 + offset

  def encode(self, texts: Sequence[Text], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: bytes + 2, then EOS (1), then padding (0)."""
    max_len = _check_max_len(max_len)
    encoded = [np.frombuffer(t.encode("utf-8") if isinstance(t, str) else bytes(t), np.uint8)
               for t in _check_texts(texts)]
    return _pack([e.astype(np.int32) + self.offset for e in encoded], max_len, self.eos_id)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` [L] up to the first EOS or padding (a cut character as U+FFFD)."""
    content = [t - self.offset for t in _content(ids, self.eos_id, self.pad_id)]
    if any(not 0 <= t < 256 for t in content):
      raise ValueError(f"Byte tokenizer ids are 0..{self.vocab_size - 1}; got "
                       f"{[t + self.offset for t in content if not 0 <= t < 256]}.")
    return bytes(content).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A sentencepiece model; its ids shifted up by one unless its pad id is already 0."""

  pad_id = 0

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f"Tokenizer spec 'sentencepiece:{path}': no such file.")
    self._model = sentencepiece.SentencePieceProcessor()
    try:
      self._model.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"Tokenizer spec 'sentencepiece:{path}': not a sentencepiece model "
                       f"({e}).") from None
    if self._model.eos_id() < 0:
      raise ValueError(f"Tokenizer spec 'sentencepiece:{path}': the model has no EOS piece "
                       "(train it with eos_id >= 0, sentencepiece's default).")
    self.shift = 0 if self._model.pad_id() == 0 else 1
    self.eos_id = self._model.eos_id() + self.shift
    self.vocab_size = self._model.get_piece_size() + self.shift

  def encode(self, texts: Sequence[Text], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: pieces, then EOS, then padding (0)."""
    max_len = _check_max_len(max_len)
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
             for t in _check_texts(texts)]
    pieces = self._model.EncodeAsIds(texts) if texts else []
    return _pack([[p + self.shift for p in row] for row in pieces], max_len, self.eos_id)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` [L] up to the first EOS or padding."""
    content = _content(ids, self.eos_id, self.pad_id)
    return self._model.DecodeIds([t - self.shift for t in content])


def get(spec: str = "bytes") -> ByteTokenizer | SentencePieceTokenizer:
  """The tokenizer of `spec` (module docstring); a ValueError names the accepted forms."""
  if spec == "bytes" or (isinstance(spec, str) and spec.startswith("sentencepiece:")
                         and len(spec) > len("sentencepiece:")):
    return _load(spec)
  raise ValueError(f"Unknown tokenizer spec {spec!r}; accepted: {SPECS}.")


@functools.lru_cache(maxsize=16)
def _load(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
  """One tokenizer per spec (a sentencepiece file is read once per process)."""
  if spec == "bytes":
    return ByteTokenizer()
  return SentencePieceTokenizer(spec[len("sentencepiece:"):])
