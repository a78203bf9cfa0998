"""DINO's self-distillation cross-entropy (Caron et al. 2021), the official DINOLoss value,
and DINOv2's (Oquab et al. 2023) Sinkhorn-Knopp teacher targets and KoLeo regulariser."""
import jax
import jax.numpy as jnp


def centered_targets(teacher: jax.Array, center: jax.Array,
                     teacher_temp: jax.Array | float) -> jax.Array:
  """DINO's teacher targets: softmax((teacher - center) / teacher_temp) over the last axis."""
  return jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)


def sinkhorn_knopp_targets(teacher: jax.Array, teacher_temp: jax.Array | float,
                           iterations: int = 3) -> jax.Array:
  """DINOv2's teacher targets: exp(teacher / teacher_temp), with prototypes (columns) and
  samples (rows) alternately rescaled `iterations` times to equal total mass.

  teacher [..., N, K] (N samples: every crop and image of the global batch) -> [..., N, K],
  each row a distribution whose mass over the N rows is spread evenly across the K
  prototypes, instead of centering's running mean. Computed in log space.
  """
  log_q = teacher / teacher_temp  # [..., N, K]
  for _ in range(iterations):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=-2, keepdims=True)  # columns sum to 1
    log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)  # rows sum to 1
  return jnp.exp(log_q)


def dino_cross_entropy(student: jax.Array, targets: jax.Array, *,
                       student_temp: float) -> jax.Array:
  """Mean over (teacher crop i, student crop v != i) pairs of the batch mean of
  H(targets_i, softmax(student_v / student_temp)).

  student [V, B, K] logits of V crops, targets [T, B, K] of the T global crops (student
  crop v and teacher crop v are the same view, v < T).
  """
  num_teacher, num_student = targets.shape[0], student.shape[0]
  log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)  # [V, B, K]
  cross = -jnp.einsum("tbk,vbk->tvb", targets, log_probs).mean(-1)  # [T, V]
  other_view = jnp.arange(num_teacher)[:, None] != jnp.arange(num_student)[None, :]  # [T, V]
  return (cross * other_view).sum() / other_view.sum()


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, *,
              student_temp: float, teacher_temp: jax.Array | float) -> jax.Array:
  """`dino_cross_entropy` with DINO's centered targets of teacher [T, B, K] and center [K].

  The center's update is the caller's (tasks/dino.py).
  """
  return dino_cross_entropy(student, centered_targets(teacher, center, teacher_temp),
                            student_temp=student_temp)


def koleo_loss(features: jax.Array, eps: float = 1e-8) -> jax.Array:
  """DINOv2's KoLeo regulariser: -mean_i log ||x_i - x_nn(i)|| of L2-normalised features.

  features [..., N, D]: each row's nearest other row (by cosine similarity) within its
  group of N. Minimising it spreads the features apart, against collapse.
  """
  x = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), eps)
  similarity = jnp.einsum("...nd,...md->...nm", x, x)  # [..., N, N]
  n = x.shape[-2]
  similarity = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, similarity)
  nearest = jnp.take_along_axis(x, jnp.argmax(similarity, axis=-1)[..., None], axis=-2)
  distance = jnp.linalg.norm(x - nearest + eps, axis=-1)  # [..., N]
  return -jnp.log(distance + eps).mean()
