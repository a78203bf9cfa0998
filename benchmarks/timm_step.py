r"""Train-step throughput of a timm model in PyTorch, the counterpart of `train_step.py`.

  python -m benchmarks.timm_step --name efficientvit_m0 --batch_size 32 --res 224
  python -m benchmarks.timm_step --name vit_base_patch16_224 --batch_size 256 --res 224 \
      --device cuda --precision bfloat16 --compile

Runs in its own process (torch is a test/benchmark-only dependency and must not share a
process with TensorFlow). One step = forward, cross-entropy, backward and AdamW update on
a fixed random batch in float32, on the CPU with as many threads as JAX uses or on the GPU
(`--device cuda`, with TF32 matmuls and convolutions allowed, as JAX's default precision
does on GPU). `--precision bfloat16` runs forward and loss under torch.autocast(bfloat16)
(parameters and optimizer state stay float32, as the JAX side's dtype_mm="bfloat16");
`--compile` wraps the model in torch.compile (default mode), whose compilation happens in
the first step. Prints one JSON line: {"name", "params", "images_per_sec", "step_seconds",
"first_step_seconds"}; the first step includes torch.compile's compilation.
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
  parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--compile", action="store_true", help="torch.compile the model.")
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
  forward = torch.compile(model) if args.compile else model
  images = torch.randn(args.batch_size, 3, args.res, args.res, device=device)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
  sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None

  autocast = torch.autocast(args.device, dtype=torch.bfloat16,
                            enabled=args.precision == "bfloat16")

  def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(forward(images).float(), labels)
    loss.backward()
    optimizer.step()

  start = time.perf_counter()
  step()
  sync()
  first_step_seconds = time.perf_counter() - start
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
                    "images_per_sec": args.batch_size / seconds, "step_seconds": seconds,
                    "first_step_seconds": first_step_seconds}))


if __name__ == "__main__":
  main()
