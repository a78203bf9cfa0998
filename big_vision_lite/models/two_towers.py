"""Image-text two-tower model (CLIP, SigLIP, LiT): an image tower, a text tower, both
projected to `out_dim` and L2-normalised, with a learned temperature and bias.

  out, aux = Model(image_model="vit", image=dict(variant="B/16"), text=dict(variant="B",
                   vocab_size=32_000), out_dim=768).apply(variables, images, text=tokens)
  # out = {"zimg": [B, D], "ztxt": [N, D], "temperature": exp(t), "bias": b or None}

Params: {"img": <the image model's own params>, "txt": <text_transformer's params>, "t": (),
"b": ()}. The towers are `models.get(image_model).Model(**image)` and
`text_transformer.Model(**text)`, each with `num_classes=out_dim` unless its dict sets it:
the tower's own linear "head" is the projection (as in big_vision), and `head_zeroinit`
defaults to False there. A tower with num_classes 0 (no head) must give `out_dim` wide
features itself, e.g. LiT's locked ViT-B (width 768) with out_dim=768, so that
`frozen_params=["img/.*"]` freezes the whole image side. (To lock a tower but train its
head: `frozen_params=["img/(?!head/).*"]`.)

`temperature_init` is the initial temperature (t = log of it) and `bias_init` the initial
bias (None: no "b" param and bias None): SigLIP 10.0 / -10.0 (the defaults), CLIP
1 / 0.07 / None. `images=None` or `text=None` skips that tower (its z is None).

Packed NaViT image tower: keyword inputs of `apply` after `text` (segment_ids, positions,
image_sizes) go to the image tower, and zimg is [B, S, D], one row per image slot.

init_from: a run or import of an image model fills params["img"] (`load_backbone`; its
classifier "head" is dropped, the tower's projection head starts fresh); the tower's own
`load` (e.g. a ViT's position embedding resampling) then adapts it (`load`). A two-towers
run is, for a run of its image model, a wrapper whose "img" params are its backbone.
"""
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite import models
from big_vision_lite.models import layers
from big_vision_lite.models import text_transformer

# Registered models that are not image feature extractors [B, H, W, 3] -> [B, D].
NOT_IMAGE_TOWERS = ("two_towers", "text_transformer", "detr", "dino", "fcmae")
IMAGE_MODELS = tuple(m for m in models.KNOWN if m not in NOT_IMAGE_TOWERS)
# init_from also takes a run or import of an image model (into params["img"]), or a
# DINO run's backbone, or an FCMAE run for a ConvNeXt V2 tower (see `load_backbone`).
LOADS_FROM = IMAGE_MODELS + ("dino", "fcmae")
BACKBONE_KEY = "img"  # For a run of the image model, a two-towers run's backbone params.
BACKBONE_FIELD = "image"  # Config field model.image: the backbone's kwargs.
BACKBONE_FROM_EMA = False
NORM_EPS = 1e-12  # Squared-norm floor of the L2 normalisation (an all-zero row stays 0).


def backbone(model_kwargs: Mapping[str, Any]) -> str:
  """The registered model name of the image tower of a two-towers model."""
  return model_kwargs.get("image_model", "vit")


def l2_normalize(x: jax.Array) -> jax.Array:
  """x [..., D] -> float32 rows of unit L2 norm (all-zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), NORM_EPS))


def _tower(model_class: Any, kwargs: dict[str, Any], field: str) -> nn.Module:
  """An unbound tower; a bad kwarg raises a ValueError naming `field`."""
  names = [f for f in model_class.__dataclass_fields__ if f not in ("parent", "name")]
  unknown = sorted(set(kwargs) - set(names))
  if unknown:
    raise ValueError(f"Model field {field!r} has unknown keys {unknown}; accepted: "
                     f"{', '.join(names)}.")
  try:
    return model_class(**kwargs, parent=None)
  except ValueError as e:
    raise ValueError(f"In Model field {field!r} (a tower's fields): {e}") from e


class Model(nn.Module):
  """Image and text towers -> L2-normalised embeddings; see the module docstring."""
  image_model: str = "vit"
  image: Mapping[str, Any] | None = None  # A dict or ConfigDict of the image Model's fields.
  text: Mapping[str, Any] | None = None  # Of text_transformer.Model's fields.
  out_dim: int = 128
  temperature_init: float = 10.0
  bias_init: float | None = -10.0
  dtype_mm: str | None = None  # Given to each tower with a dtype_mm field its dict leaves out.

  def __post_init__(self):
    layers.check_choice("image_model", self.image_model, IMAGE_MODELS)
    for field in ("image", "text"):
      value = getattr(self, field)
      if value is not None and not hasattr(value, "keys"):
        raise ValueError(f"Model field {field!r} must be a mapping of the tower's Model "
                         f"fields or None, got {value!r}.")
    if isinstance(self.out_dim, bool) or not isinstance(self.out_dim, int) or self.out_dim < 1:
      raise ValueError(f"Model field 'out_dim' must be an int >= 1, got {self.out_dim!r}.")
    if not (isinstance(self.temperature_init, (int, float)) and
            0 < self.temperature_init < math.inf):
      raise ValueError(f"Model field 'temperature_init' must be a finite number > 0 (SigLIP "
                       f"10.0, CLIP {1 / 0.07:.4g}), got {self.temperature_init!r}.")
    if self.bias_init is not None and not (isinstance(self.bias_init, (int, float)) and
                                           math.isfinite(self.bias_init)):
      raise ValueError(f"Model field 'bias_init' must be a finite number (SigLIP -10.0) or "
                       f"None (CLIP: no bias), got {self.bias_init!r}.")
    if self.dtype_mm is not None:
      layers.check_choice("dtype_mm", self.dtype_mm, layers.DTYPES_MM)
    self.image_tower()
    self.text_tower()
    super().__post_init__()

  def _tower_kwargs(self, model_class: Any, own: Mapping[str, Any] | None) -> dict[str, Any]:
    fields = model_class.__dataclass_fields__
    defaults: dict[str, Any] = {"num_classes": self.out_dim}
    if "head_zeroinit" in fields:
      defaults["head_zeroinit"] = False  # A zero projection would give all-zero embeddings.
    if self.dtype_mm is not None and "dtype_mm" in fields:
      defaults["dtype_mm"] = self.dtype_mm
    return {**defaults, **dict(own or {})}

  def image_tower_kwargs(self) -> dict[str, Any]:
    """The image Model's kwargs: `image` over num_classes=out_dim, head_zeroinit=False."""
    return self._tower_kwargs(models.get(self.image_model).Model, self.image)

  def text_tower_kwargs(self) -> dict[str, Any]:
    """The text Model's kwargs: `text` over num_classes=out_dim."""
    return self._tower_kwargs(text_transformer.Model, self.text)

  def image_tower(self) -> nn.Module:
    """The unbound image Model (e.g. for its `hparams()`)."""
    return _tower(models.get(self.image_model).Model, self.image_tower_kwargs(), "image")

  def text_tower(self) -> nn.Module:
    """The unbound text Model."""
    return _tower(text_transformer.Model, self.text_tower_kwargs(), "text")

  def _embed(self, features: jax.Array, tower: str) -> jax.Array:
    if features.shape[-1] != self.out_dim:
      raise ValueError(f"The {tower} tower gives features of width {features.shape[-1]}, not "
                       f"Model field 'out_dim' ({self.out_dim}): give the tower a projection "
                       f"head (num_classes=out_dim, the default) or set out_dim to its width.")
    return l2_normalize(features)

  @nn.compact
  def __call__(self, images: jax.Array | None, text: jax.Array | None = None, *,
               train: bool = False, **image_kwargs: Any
               ) -> tuple[dict[str, jax.Array | None], dict[str, Any]]:
    """images [B, H, W, 3] (or packed patches with `image_kwargs`), text [N, L] int32 ->
    ({"zimg": [B, D] ([B, S, D] packed), "ztxt": [N, D], "temperature", "bias"}, aux with
    the towers' aux under "img" and "txt", and the image tower's "pre_logits")."""
    out: dict[str, jax.Array | None] = {"zimg": None, "ztxt": None}
    aux: dict[str, Any] = {}
    if images is not None:
      tower = models.get(self.image_model).Model(**self.image_tower_kwargs(), name="img")
      features, aux["img"] = tower(images, train=train, **image_kwargs)
      if "pre_logits" in aux["img"]:  # What k-NN and linear probes read (Task.features).
        aux["pre_logits"] = aux["img"]["pre_logits"]  # [B, width] or [B, S, width]
      out["zimg"] = self._embed(features, "image")  # [B, D] or [B, S, D]
    if text is not None:
      tower = text_transformer.Model(**self.text_tower_kwargs(), name="txt")
      features, aux["txt"] = tower(text, train=train)
      out["ztxt"] = self._embed(features, "text")  # [N, D]
    t = self.param("t", lambda _: jnp.log(jnp.asarray(self.temperature_init, jnp.float32)))
    out["temperature"] = jnp.exp(t.astype(jnp.float32))  # float32 also under a bf16 cast.
    out["bias"] = None
    if self.bias_init is not None:
      b = self.param("b", lambda _: jnp.asarray(self.bias_init, jnp.float32))
      out["bias"] = b.astype(jnp.float32)
    return out, aux


def load_backbone(init_variables: Mapping[str, Any], loaded_variables: Mapping[str, Any],
                  model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The variables of a two-towers model whose image tower comes from a checkpoint of an
  image model alone (a `vit` run, a timm import, ...): each collection of the checkpoint
  goes under "img", without its classifier "head"; the tower's own "head" (its projection,
  if it has one) and everything else keep their `init_variables` values."""
  del model_kwargs
  variables = {}
  for collection, values in init_variables.items():
    values = dict(values)
    if collection in loaded_variables and BACKBONE_KEY in values:
      tower = {k: v for k, v in loaded_variables[collection].items() if k != "head"}
      if "head" in values[BACKBONE_KEY]:
        tower["head"] = values[BACKBONE_KEY]["head"]
      values[BACKBONE_KEY] = tower
    variables[collection] = values
  return variables


def load(init_params: Mapping[str, Any], loaded_params: Mapping[str, Any],
         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Adapts loaded params to the model of `init_params`: params["img"] through the image
  model's own `load` (e.g. a ViT's position embeddings resampled to the new grid)."""
  params = dict(loaded_params)
  model = Model(**model_kwargs, parent=None)
  image_module = models.get(model.image_model)
  if hasattr(image_module, "load") and BACKBONE_KEY in params and BACKBONE_KEY in init_params:
    params[BACKBONE_KEY] = image_module.load(init_params[BACKBONE_KEY], params[BACKBONE_KEY],
                                             model.image_tower_kwargs())
  return params
