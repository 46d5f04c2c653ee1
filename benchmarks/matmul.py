"""The matmul ceiling: FLOP/s of one n x n x n matmul on one device, the MFU denominator.

  python -m benchmarks.matmul                      # 8192^3 bf16 on GPU/TPU, 1024^3 fp32 on CPU
  python -m benchmarks.matmul --size 4096,8192 --dtype bfloat16

The train-step and sampling benchmarks measure the same ceiling in their own run
(`--ceiling`), so the MFU they report is against what the device reached that day.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common


def default_size() -> int:
    """8192 on accelerators (as issue 12 asks); 1024 on CPU, where 8192^3 takes ~10 s."""
    return 8192 if common.accelerator() else 1024


def matmul_tflops(size: int, dtype: str, rounds: int = 5, calls: int = 10) -> float:
    """Median TFLOP/s of `calls` back-to-back (size^3) matmuls on the first device, over
    `rounds` rounds; inputs resident on the device, output in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))  # compile, warm up
    seconds = []
    for _ in range(rounds):
        _, t = common.timed(lambda: [matmul(a, b) for _ in range(calls)])
        seconds.append(t / calls)
    return 2.0 * size**3 / common.median(seconds) / 1e12


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="", help="n, or n1,n2,...; default 8192 (CPU: 1024)")
    parser.add_argument("--dtype", default="", help="default bfloat16 (CPU: float32)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.size.split(",")] if args.size else [default_size()]
    dtype = args.dtype or common.default_dtype()
    rows = []
    for size in sizes:
        tflops = matmul_tflops(size, dtype, args.rounds)
        ms = 2.0 * size**3 / (tflops * 1e12) * 1e3
        rows.append((f"{size}^3", dtype, common.fmt(ms, 3), common.fmt(tflops, 2)))
    print(common.header("Matmul ceiling", [f"median of {args.rounds} rounds x 10 calls"]))
    print()
    print(common.table(["matmul", "dtype", "ms", "TFLOP/s"], rows))


if __name__ == "__main__":
    main()
