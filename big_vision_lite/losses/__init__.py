"""Losses shared by tasks, tests and benchmarks (`dino`), beside the kernels' own in kernels/."""
