"""The matmul ceiling: FLOP/s of one n x n x n matmul on one device, the MFU denominator.

  python -m benchmarks.matmul                      # 8192^3 bf16 on GPU/TPU, 1024^3 fp32 on CPU
  python -m benchmarks.matmul --size 4096,8192 --dtype bfloat16
  python -m benchmarks.matmul --torch              # and PyTorch's rate, interleaved

`--torch` puts PyTorch's matmul of the same size and dtype next to XLA's: where PyTorch's
BLAS is faster than XLA's on the same device, no model step can close that gap.

The train-step and sampling benchmarks measure the same ceiling in their own run
(`--ceiling`), so the MFU they report is against what the device reached that day.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import common


def default_size() -> int:
    """8192 on accelerators (as issue 12 asks); 1024 on CPU, where 8192^3 takes ~10 s."""
    return 8192 if common.accelerator() else 1024


def jax_matmul(size: int, dtype: str):
    """run(calls) -> seconds per (size^3) matmul, `calls` back to back on the first
    device; inputs resident on the device, output in `dtype`, compiled and warm."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))

    def run(calls: int) -> float:
        return common.timed(lambda: [matmul(a, b) for _ in range(calls)])[1] / calls

    return run


def torch_matmul(size: int, dtype: str):
    """The same for torch.mm on PyTorch's device (CUDA if it has one)."""
    import torch

    from benchmarks import torch_counterpart

    device, tdtype = torch_counterpart.device(), getattr(torch, dtype)
    a, b = (torch.randn(size, size, device=device, dtype=tdtype) for _ in range(2))
    torch.mm(a, b)

    def run(calls: int) -> float:
        torch_counterpart.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        torch_counterpart.synchronize()
        return (time.perf_counter() - start) / calls

    return run


def matmul_tflops(size: int, dtype: str, rounds: int = 5, calls: int = 10) -> float:
    """Median TFLOP/s of XLA's (size^3) matmul over `rounds` rounds of `calls` calls."""
    seconds = common.time_interleaved({"jax": jax_matmul(size, dtype)}, rounds, calls)["jax"]
    return 2.0 * size**3 / common.median(seconds) / 1e12


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="", help="n, or n1,n2,...; default 8192 (CPU: 1024)")
    parser.add_argument("--dtype", default="", help="default bfloat16 (CPU: float32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="add PyTorch's torch.mm rows")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.size.split(",")] if args.size else [default_size()]
    dtype = args.dtype or common.default_dtype()
    makers = {"jax": jax_matmul} | ({"torch": torch_matmul} if args.torch else {})
    runs = {(name, n): make(n, dtype) for n in sizes for name, make in makers.items()}
    times = common.time_interleaved(runs, args.rounds, 10)
    rows = []
    for (name, size), seconds in times.items():
        s = common.median(seconds)
        tflops = 2.0 * size**3 / s / 1e12
        rows.append((name, f"{size}^3", dtype, common.fmt(s * 1e3, 3), common.fmt(tflops, 2)))
    lines = [f"median of {args.rounds} rounds x 10 calls" + (", interleaved" if args.torch else "")]
    print(common.header("Matmul ceiling", lines))
    print()
    print(common.table(["framework", "matmul", "dtype", "ms", "TFLOP/s"], rows))


if __name__ == "__main__":
    common.run_main(main)
