"""DINO's self-distillation cross-entropy (Caron et al. 2021), the official DINOLoss value."""
import jax
import jax.numpy as jnp


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, *,
              student_temp: float, teacher_temp: jax.Array | float) -> jax.Array:
  """Mean over (teacher crop i, student crop v != i) pairs of the batch mean of
  H(softmax((teacher_i - center) / teacher_temp), softmax(student_v / student_temp)).

  student [V, B, K] logits of V crops, teacher [T, B, K] of the T global crops (student
  crop v and teacher crop v are the same view, v < T), center [K]. The center's update is
  the caller's (tasks/dino.py).
  """
  num_teacher, num_student = teacher.shape[0], student.shape[0]
  targets = jax.nn.softmax((teacher - center) / teacher_temp, axis=-1)  # [T, B, K]
  log_probs = jax.nn.log_softmax(student / student_temp, axis=-1)  # [V, B, K]
  cross = -jnp.einsum("tbk,vbk->tvb", targets, log_probs).mean(-1)  # [T, V]
  other_view = jnp.arange(num_teacher)[:, None] != jnp.arange(num_student)[None, :]  # [T, V]
  return (cross * other_view).sum() / other_view.sum()
