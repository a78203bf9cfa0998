"""ViT with learnable memory (Sandler et al. CVPR 2022), with attention masking for reuse.

The base is a plain ViT (`vit.py`'s parameter names, so a `vit` checkpoint loads through
`load`): its tokens (class token and/or patches) and its head are "task 0". Each new task
t = 1..T (`task_classes`) adds, under `task_{t}/`, a class token `cls` [1, 1, D], memory
`memory` [depth, m_t, D] (m_t learnable tokens appended to every layer's input as extra
keys/values and not passed on; none when m_t = 0) and a `head`. Attention masking:

  original tokens   attend to the original tokens only (the plain ViT's computation,
                    over exactly the same keys, so task 0 is unchanged bit for bit);
  task t's cls      attends to the original tokens, its own memory and itself.

Task 0 pools the original tokens as `pool_type` says (tok, gap or map); a new task reads
its class token, after the base's final norm (`encoder_norm`, or `fc_norm` for
final_norm="post_pool").

Every task's logits come from one forward pass: `aux["task_logits"]` is a tuple indexed by
task (entry 0 is the original head's logits, or its pre-logits for a headless base) and
`out` is the entry of `train_task` (default -1, the last task), the [B, C] logits a
classification loss trains. Fine-tuning recipes (head, head + cls, memory, full) are
`frozen_params` regexes (configs/memory_vit.py); `tools/concat_memory.py` merges tasks
fine-tuned separately from one base into one model.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models import layers
from big_vision_lite.models import vit

POOL_TYPES = ("tok", "gap", "map")
TASK_PREFIX = "task_"
LOADS_FROM = ("vit",)  # Other models whose checkpoints `load` takes (init_from).


def task_name(index: int) -> str:
  """Top-level parameter name of new task `index` (1-based): "task_1", ..."""
  return f"{TASK_PREFIX}{index}"


def is_task_param(name: str) -> bool:
  """Whether a top-level parameter name belongs to a new task (not to the base)."""
  suffix = name[len(TASK_PREFIX):]
  return name.startswith(TASK_PREFIX) and suffix.isdigit()


def _is_count(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def attention_mask(num_tokens: int, num_memory: Sequence[int]) -> np.ndarray:
  """Which keys each new task's class token sees: [T, N + Σm + T] booleans.

  Keys are laid out as [original tokens (N) | memory of task 1..T | cls of task 1..T].
  """
  num_tasks, total_memory = len(num_memory), sum(num_memory)
  mask = np.zeros((num_tasks, num_tokens + total_memory + num_tasks), bool)
  mask[:, :num_tokens] = True
  start = num_tokens
  for t, m in enumerate(num_memory):
    mask[t, start:start + m] = True
    mask[t, num_tokens + total_memory + t] = True
    start += m
  return mask


class NewTask(nn.Module):
  """One new task's parameters: class token, per-layer memory and head."""
  num_classes: int
  num_memory: int
  depth: int
  width: int
  head_zeroinit: bool = True

  def setup(self):
    self.cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
    self.memory = None
    if self.num_memory:
      self.memory = self.param("memory", nn.initializers.normal(stddev=0.02),
                               (self.depth, self.num_memory, self.width), jnp.float32)
    init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    self.head = nn.Dense(self.num_classes, kernel_init=init)

  def tokens(self) -> tuple[jax.Array, jax.Array | None]:
    """(cls [1, 1, D], memory [depth, m, D] or None)."""
    return self.cls, self.memory

  def __call__(self, pre_logits: jax.Array) -> jax.Array:
    """pre_logits [B, D] -> logits [B, C]."""
    return self.head(pre_logits)


class MemoryAttention(nn.Module):
  """`layers.MultiHeadAttention`'s parameters (query/key/value/out) used twice: the original
  tokens attend among themselves exactly as in ViT; the new tasks' class tokens attend,
  under `mask`, to the original tokens' keys/values (computed once) and their own."""
  num_heads: int
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, extra: jax.Array | None, mask: np.ndarray | None
               ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, N, D] original tokens; extra [B, Σm + T, D] memory then class tokens of the
    new tasks; mask [T, N + Σm + T] -> ([B, N, D], [B, T, D] or None)."""
    width = x.shape[-1]
    dense = lambda name: nn.DenseGeneral(
        (self.num_heads, width // self.num_heads), dtype=self.dtype_mm, name=name,
        kernel_init=nn.initializers.xavier_uniform())
    query, key, value = dense("query"), dense("key"), dense("value")
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype_mm, name="out",
                          kernel_init=nn.initializers.xavier_uniform())
    k, v = key(x), value(x)  # [B, N, H, Dh]
    x_out = out(layers.dot_product_attention(query(x), k, v)[0])  # [B, N, D]
    if extra is None:
      return x_out, None
    num_tasks = mask.shape[0]
    q_tasks = query(extra[:, -num_tasks:])  # [B, T, H, Dh]
    k = jnp.concatenate([k, key(extra)], axis=1)  # [B, N + Σm + T, H, Dh]
    v = jnp.concatenate([v, value(extra)], axis=1)  # [B, N + Σm + T, H, Dh]
    task_out, _ = layers.dot_product_attention(q_tasks, k, v, jnp.asarray(mask))
    return x_out, out(task_out)  # [B, T, D]


class MemoryBlock(nn.Module):
  """`vit.Encoder1DBlock` (same parameter names and, on the original tokens, the same
  computation) whose weights also update the new tasks' class tokens."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, task_cls: jax.Array | None, memory: jax.Array | None,
               mask: np.ndarray | None, train: bool = False,
               layer_drop_path: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, N, D] original tokens; task_cls [B, T, D]; memory [B, Σm, D] (this layer's,
    tasks in order) or None; mask [T, N + Σm + T] -> (x [B, N, D], task_cls [B, T, D]).
    `layer_drop_path` (a scanned stack's per-layer rate) replaces the field `drop_path`."""
    norm_attention = nn.LayerNorm(epsilon=self.layernorm_eps, name="LayerNorm_0")
    norm_mlp = nn.LayerNorm(epsilon=self.layernorm_eps, name="LayerNorm_1")
    mlp = layers.MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype_mm,
                       name="MlpBlock_0")

    def residual(x, y):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      if train and self.drop_path > 0:
        rate = self.drop_path if layer_drop_path is None else layer_drop_path
        y = layers.stochastic_depth(y, rate, self.make_rng("dropout"))
      return x + y

    extra = None
    if task_cls is not None:
      extra = task_cls if memory is None else jnp.concatenate([memory, task_cls], axis=1)
      extra = norm_attention(extra)  # [B, Σm + T, D]
    attended, task_attended = MemoryAttention(
        self.num_heads, self.dtype_mm, name="MultiHeadDotProductAttention_0")(
            norm_attention(x), extra, mask)
    x = residual(x, attended)
    x = residual(x, mlp(norm_mlp(x), train))
    if task_cls is not None:
      task_cls = residual(task_cls, task_attended)
      task_cls = residual(task_cls, mlp(norm_mlp(task_cls), train))
    return x, task_cls


class Encoder(nn.Module):
  """`vit.Encoder` (names `encoderblock_{i}`, or scanned `encoderblock`, and `encoder_norm`)
  over both token streams."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  gelu_approximate: bool = True
  layernorm_eps: float = layers.FLAX_NORM_EPS
  dtype_mm: str = "float32"
  final_norm: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, task_cls: jax.Array | None, memory: jax.Array | None,
               mask: np.ndarray | None, train: bool = False
               ) -> tuple[jax.Array, jax.Array | None, dict[str, Any]]:
    """x [B, N, D], task_cls [B, T, D], memory [depth, B, Σm, D] or None ->
    (x [B, N, D], task_cls [B, T, D], aux with "block{i:02d}")."""
    aux: dict[str, Any] = {}
    block = layers.remat(MemoryBlock, self.remat_policy, static_argnums=(5,))
    rates = layers.drop_path_rates(self.drop_path, self.depth)
    if self.scan_layers:
      def layer(module, carry, inputs):
        layer_memory, rate = inputs
        x, task_cls = module(*carry, layer_memory, mask, train, rate)
        return (x, task_cls), x
      (x, task_cls), outputs = nn.scan(
          layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          length=self.depth)(
              block(self.mlp_dim, self.num_heads, self.dropout, self.drop_path,
                    self.gelu_approximate, self.layernorm_eps, self.dtype_mm,
                    name="encoderblock"),
              (x, task_cls), (memory, jnp.asarray(rates, jnp.float32)))  # [depth, B, N, D]
    else:
      outputs = []
      for i, rate in enumerate(rates):
        x, task_cls = block(
            self.mlp_dim, self.num_heads, self.dropout, rate, self.gelu_approximate,
            self.layernorm_eps, self.dtype_mm, name=f"encoderblock_{i}")(
                x, task_cls, None if memory is None else memory[i], mask, train)
        outputs.append(x)
    for i in range(self.depth):
      aux[f"block{i:02d}"] = outputs[i]
    if self.final_norm:
      norm = nn.LayerNorm(epsilon=self.layernorm_eps, name="encoder_norm")
      x = norm(x)
      task_cls = None if task_cls is None else norm(task_cls)
    return x, task_cls, aux


class Model(vit.Model):
  """ViT + new tasks with memory. Base fields as `vit.Model`; `task_classes` (classes of
  each new task), `num_memory` (memory tokens per layer: one int for every task, or one
  per task), `train_task` (index of the task whose logits are `out`; 0 = original)."""
  task_classes: Sequence[int] = ()
  num_memory: int | Sequence[int] = 0
  train_task: int = -1

  def __post_init__(self):
    layers.check_choice("pool_type", self.pool_type, POOL_TYPES)
    if (isinstance(self.task_classes, (str, bytes))
        or not all(_is_count(c) and c > 0 for c in self.task_classes)):
      raise ValueError(f"Model field 'task_classes' must be a sequence of ints > 0 (classes "
                       f"of each new task), got {self.task_classes!r}.")
    self.memory_per_task()
    num_tasks = len(self.task_classes) + 1
    if not _is_count(self.train_task) or not -num_tasks <= self.train_task < num_tasks:
      raise ValueError(f"Model field 'train_task' must be an int in [{-num_tasks}, "
                       f"{num_tasks - 1}] (0 = the original head, -1 = the last task), got "
                       f"{self.train_task!r}.")
    super().__post_init__()

  def memory_per_task(self) -> tuple[int, ...]:
    """Memory tokens per layer of each new task (`num_memory` resolved)."""
    memory = self.num_memory
    if _is_count(memory):
      memory = (memory,) * len(self.task_classes)
    if (isinstance(memory, (str, bytes)) or not isinstance(memory, Sequence)
        or len(memory) != len(self.task_classes)
        or not all(_is_count(m) and m >= 0 for m in memory)):
      raise ValueError(f"Model field 'num_memory' must be an int >= 0 or one int >= 0 per "
                       f"task of 'task_classes' ({len(self.task_classes)}), got "
                       f"{self.num_memory!r}.")
    return tuple(int(m) for m in memory)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, Any]]:
    """images [B, H, W, 3] -> (logits [B, C] of `train_task`, aux with "task_logits")."""
    hp = self.hparams()
    patch, width = hp["patch_size"], hp["width"]
    layers.check_images(images, "MemoryViT", patch)
    aux: dict[str, Any] = {}
    x, aux["stem"] = vit.embed_patches(self, images, width, patch, self.posemb,
                                       self.pool_type == "tok", self.dtype_mm)  # [B, (1+)N, D]
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    batch = x.shape[0]

    memory_counts = self.memory_per_task()
    tasks = [NewTask(c, m, hp["depth"], width, self.head_zeroinit, name=task_name(t + 1))
             for t, (c, m) in enumerate(zip(self.task_classes, memory_counts))]
    task_cls, mask, memory = None, None, None
    if tasks:
      tokens = [task.tokens() for task in tasks]
      task_cls = jnp.concatenate([cls for cls, _ in tokens], axis=1)  # [1, T, D]
      task_cls = jnp.tile(task_cls, (batch, 1, 1)).astype(x.dtype)  # [B, T, D]
      mask = attention_mask(x.shape[1], memory_counts)
      per_task = [mem for _, mem in tokens if mem is not None]
      if per_task:
        stacked = jnp.concatenate(per_task, axis=1).astype(x.dtype)  # [depth, Σm, D]
        memory = jnp.tile(stacked[:, None], (1, batch, 1, 1))  # [depth, B, Σm, D]

    pre_pool = self.final_norm == "pre_pool"
    x, task_cls, encoder_aux = Encoder(
        hp["depth"], hp["mlp_dim"], hp["num_heads"], self.dropout, self.drop_path,
        self.gelu_approximate, self.layernorm_eps, self.dtype_mm, final_norm=pre_pool,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers, name="Transformer")(
            x, task_cls, memory, mask, train)
    aux.update(encoder_aux)
    aux["encoded"] = x
    x = layers.pool_tokens(x, self.pool_type, hp["mlp_dim"], hp["num_heads"],
                        self.gelu_approximate, self.layernorm_eps, self.dtype_mm)  # [B, D]
    if not pre_pool:
      fc_norm = nn.LayerNorm(epsilon=self.layernorm_eps, name="fc_norm")
      x = fc_norm(x)
      task_cls = None if task_cls is None else fc_norm(task_cls)
    pre_logits = [x] + [task_cls[:, t] for t in range(len(tasks))]  # [B, D] each
    logits = [x]
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      logits = [nn.Dense(self.num_classes, kernel_init=init, name="head")(x)]  # [B, C]
    logits += [task(pre_logits[t + 1]) for t, task in enumerate(tasks)]  # [B, C_t] each
    aux["task_pre_logits"] = tuple(pre_logits)
    aux["task_logits"] = tuple(logits)
    aux["pre_logits"] = pre_logits[self.train_task]
    aux["logits"] = logits[self.train_task]
    return aux["logits"], aux


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
  """(base params, [params of task 1, task 2, ...]); a `vit` tree has no tasks."""
  base = {k: v for k, v in params.items() if not is_task_param(k)}
  indices = sorted(int(k[len(TASK_PREFIX):]) for k in params if is_task_param(k))
  if indices != list(range(1, len(indices) + 1)):
    raise ValueError(f"New-task params must be {task_name(1)}..{task_name(len(indices))}, "
                     f"got {', '.join(task_name(i) for i in indices)}.")
  return base, [params[task_name(i)] for i in indices]


def load(init_params: Mapping[str, Any], loaded_params: Mapping[str, Any],
         model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Adapts a `vit` or `memory_vit` checkpoint to the model of `init_params`.

  Base params load as in `vit.load` (position embeddings resampled to the new grid); new
  tasks the checkpoint lacks keep their fresh values from `init_params`. Anything else
  that differs is left for the caller's shape check to name.
  """
  params = vit.load(init_params, loaded_params, model_kwargs)
  for name, value in init_params.items():
    if is_task_param(name) and name not in params:
      params[name] = value
  return params
