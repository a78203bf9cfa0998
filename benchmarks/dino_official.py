r"""configs/dino.py's CPU recipe run by the official DINO code (PyTorch), as a quality reference.

Not a speed benchmark: it answers "does DINO's own implementation, given the same recipe and
the same data, reach a k-NN top-1 that ours does not?". It imports the official code's model
(`vision_transformer.VisionTransformer`, `DINOHead`), `utils.MultiCropWrapper`, `DINOLoss`,
its schedules (`utils.cosine_scheduler`), gradient handling (`utils.clip_gradients`,
`utils.cancel_gradients_last_layer`), blur and solarisation, and `eval_knn.knn_classifier`
from a checkout of github.com/facebookresearch/dino, and replays `train_one_epoch` step by
step on the embedded "shapes" dataset with configs/dino.py's sizes and schedules (counted in
steps instead of epochs). Needs torch and torchvision (test-only dependencies):

  git clone https://github.com/facebookresearch/dino /tmp/dino_official
  python -m benchmarks.dino_official --official /tmp/dino_official --steps 300

It prints the teacher's k-NN top-1 / top-5 (k 20, T 0.07, the 8000 train images as the bank,
the 1000 test images as queries, images resized to the global crop size) at step 0 (random
init) and at the end, and the teacher's mean entropy per logged step.
"""
import argparse
import functools
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from big_vision_lite.input import shapes


def load_split(split: str, num_examples: int) -> tuple[list[Image.Image], np.ndarray]:
  """The embedded dataset's `split` as PIL images and int labels, drawn as its builder draws
  them (example i from its own generator), so no tfds is needed beside torch."""
  images, labels = [], []
  for i in range(num_examples):
    example = shapes.draw_example(shapes.example_rng(split, i))
    images.append(Image.open(io.BytesIO(example["image"])).convert("RGB"))
    labels.append(example["label"])
  return images, np.asarray(labels)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", required=True, help="checkout of facebookresearch/dino")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=5e-4)
  parser.add_argument("--min_lr_ratio", type=float, default=0.01)
  parser.add_argument("--warmup_steps", type=int, default=30)
  parser.add_argument("--freeze_last_layer_steps", type=int, default=30)
  parser.add_argument("--teacher_temp", type=float, default=0.02)
  parser.add_argument("--warmup_teacher_temp", type=float, default=0.02)
  parser.add_argument("--teacher_temp_warmup_steps", type=int, default=0)
  parser.add_argument("--momentum_teacher", type=float, default=0.99)
  parser.add_argument("--drop_path", type=float, default=0.0)
  parser.add_argument("--out_dim", type=int, default=4096)
  parser.add_argument("--global_size", type=int, default=32)
  parser.add_argument("--local_size", type=int, default=16)
  parser.add_argument("--num_local", type=int, default=4)
  parser.add_argument("--jitter", type=float, nargs=4, default=(0.4, 0.4, 0.8, 0.5),
                      help="brightness contrast saturation hue (configs/dino.py's default)")
  parser.add_argument("--grayscale_p", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  sys.path.insert(0, os.path.abspath(args.official))
  import torch  # pylint: disable=import-outside-toplevel
  import torch.distributed as dist  # pylint: disable=import-outside-toplevel
  from torchvision import transforms  # pylint: disable=import-outside-toplevel
  import eval_knn  # pylint: disable=import-outside-toplevel
  import main_dino  # pylint: disable=import-outside-toplevel
  import utils  # pylint: disable=import-outside-toplevel
  import vision_transformer as vits  # pylint: disable=import-outside-toplevel

  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  # DINOLoss.update_center all-reduces over the process group: a group of one.
  dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)

  # The official DataAugmentationDINO with configs/dino.py's sizes and colours; blur radii
  # scaled from 224 px as configs/dino.py scales them.
  blur = dict(radius_min=0.1 * args.global_size / 224, radius_max=2.0 * args.global_size / 224)
  flip_and_color_jitter = transforms.Compose([
      transforms.RandomHorizontalFlip(p=0.5),
      transforms.RandomApply([transforms.ColorJitter(*args.jitter)], p=0.8),
      transforms.RandomGrayscale(p=args.grayscale_p)])
  normalize = transforms.Compose([
      transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  crop = functools.partial(transforms.RandomResizedCrop, interpolation=Image.BICUBIC)
  global1 = transforms.Compose([crop(args.global_size, scale=(0.4, 1.0)), flip_and_color_jitter,
                                utils.GaussianBlur(1.0, **blur), normalize])
  global2 = transforms.Compose([crop(args.global_size, scale=(0.4, 1.0)), flip_and_color_jitter,
                                utils.GaussianBlur(0.1, **blur), utils.Solarization(0.2),
                                normalize])
  local = transforms.Compose([crop(args.local_size, scale=(0.05, 0.4)), flip_and_color_jitter,
                              utils.GaussianBlur(0.5, **blur), normalize])
  eval_transform = transforms.Compose([
      transforms.Resize((args.global_size, args.global_size)), normalize])

  # configs/vit.py's MINI ViT (width 96, depth 4, 4 heads, MLP 384) with 4 x 4 patches.
  def vit(drop_path_rate):
    return vits.VisionTransformer(
        img_size=[args.global_size], patch_size=4, embed_dim=96, depth=4, num_heads=4,
        mlp_ratio=4, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate)
  head = functools.partial(vits.DINOHead, 96, args.out_dim, use_bn=False, norm_last_layer=True,
                           hidden_dim=512, bottleneck_dim=128)
  student = utils.MultiCropWrapper(vit(args.drop_path), head())
  teacher = utils.MultiCropWrapper(vit(0.0), head())
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  # DINOLoss indexes its teacher temperature schedule by epoch: here by step.
  dino_loss = main_dino.DINOLoss(args.out_dim, 2 + args.num_local, args.warmup_teacher_temp,
                                 args.teacher_temp, args.teacher_temp_warmup_steps, args.steps)
  optimizer = torch.optim.AdamW(utils.get_params_groups(student))
  lr_schedule = utils.cosine_scheduler(args.lr, args.lr * args.min_lr_ratio, args.steps, 1,
                                       warmup_epochs=args.warmup_steps)
  wd_schedule = utils.cosine_scheduler(0.04, 0.4, args.steps, 1)
  momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.steps, 1)

  train_images, train_labels = load_split("train", 8000)
  test_images, test_labels = load_split("test", 1000)

  @torch.no_grad()
  def knn() -> tuple[float, float]:
    teacher.eval()
    def features(images):
      out = [teacher.backbone(torch.stack([eval_transform(im) for im in images[i:i + 500]]))
             for i in range(0, len(images), 500)]
      return torch.nn.functional.normalize(torch.cat(out), dim=1)
    return eval_knn.knn_classifier(features(train_images), torch.from_numpy(train_labels),
                                   features(test_images), torch.from_numpy(test_labels),
                                   20, 0.07, num_classes=len(shapes.CLASSES))

  print(f"step 0 (random init): teacher k-NN top-1 / top-5 = {knn()}", flush=True)
  rng = np.random.default_rng(args.seed)
  start = time.time()
  student.train()
  for it in range(args.steps):
    for i, group in enumerate(optimizer.param_groups):
      group["lr"] = lr_schedule[it]
      if i == 0:  # Only the first group is regularised.
        group["weight_decay"] = wd_schedule[it]
    batch = rng.choice(len(train_images), args.batch_size, replace=False)
    views = [[global1(train_images[j]) for j in batch], [global2(train_images[j]) for j in batch]]
    views += [[local(train_images[j]) for j in batch] for _ in range(args.num_local)]
    images = [torch.stack(v) for v in views]
    teacher_output = teacher(images[:2])
    student_output = student(images)
    loss = dino_loss(student_output, teacher_output, it)
    optimizer.zero_grad()
    loss.backward()
    utils.clip_gradients(student, 3.0)
    utils.cancel_gradients_last_layer(it, student, args.freeze_last_layer_steps)
    optimizer.step()
    with torch.no_grad():
      m = momentum_schedule[it]
      for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
    if (it + 1) % 25 == 0:
      temp = dino_loss.teacher_temp_schedule[it]
      probs = torch.softmax((teacher_output - dino_loss.center) / temp, -1)
      entropy = float(-(probs * torch.log(probs + 1e-12)).sum(-1).mean())
      print(f"step {it + 1}: loss {loss.item():.4f} teacher entropy {entropy:.3f} "
            f"({time.time() - start:.0f} s)", flush=True)
  print(f"step {args.steps}: teacher k-NN top-1 / top-5 = {knn()}", flush=True)


if __name__ == "__main__":
  main()
