r"""Train-step throughput of a timm model in PyTorch, the counterpart of `train_step.py`.

  python -m benchmarks.timm_step --name efficientvit_m0 --batch_size 32 --res 224

Runs in its own process (torch is a test/benchmark-only dependency and must not share a
process with TensorFlow). One step = forward, cross-entropy, backward and AdamW update on
a fixed random batch in float32, on the CPU with as many threads as JAX uses or on the GPU
(`--device cuda`, with TF32 matmuls and convolutions allowed, as JAX's default precision
does on GPU). Prints one JSON line: {"name", "params", "images_per_sec", "step_seconds"}.
"""
import argparse
import json
import os
import statistics
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--name", required=True, help="timm model name.")
  parser.add_argument("--batch_size", type=int, required=True)
  parser.add_argument("--res", type=int, required=True)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  args = parser.parse_args()
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  if args.device == "cuda":
    torch.set_float32_matmul_precision("high")
  torch.manual_seed(0)
  device = torch.device(args.device)
  model = timm.create_model(args.name, pretrained=False, num_classes=args.num_classes)
  model.to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
  images = torch.randn(args.batch_size, 3, args.res, args.res, device=device)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
  sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None

  def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  for _ in range(args.warmup):
    step()
  sync()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  print(json.dumps({"name": args.name, "params": sum(p.numel() for p in model.parameters()),
                    "images_per_sec": args.batch_size / seconds, "step_seconds": seconds}))


if __name__ == "__main__":
  main()
