"""`make bench`: speed and memory numbers as JSON (never in timed tests).

Each benchmark is a function returning a dict; results of one run are measured side by side
on the same machine, so ratios between them are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHES: dict[str, Callable[[], dict[str, Any]]] = {}


def bench(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def deco(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        BENCHES[name] = fn
        return fn

    return deco


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@bench("matmul_throughput")
def matmul_throughput() -> dict[str, Any]:
    """Peak dense matmul throughput of this machine (the reference for model efficiency)."""
    import torch

    n = 1024
    out: dict[str, Any] = {"n": n}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        sec = _best_of(lambda a=a, b=b: [a @ b for _ in range(4)]) / 4
        out[f"{str(dtype).split('.')[-1]}_gflops"] = round(2 * n**3 / sec / 1e9, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--only", nargs="*", help="benchmark names to run")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    results: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    for name, fn in BENCHES.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        results[name] = fn()
        results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    from unibrain_cli.io.atomic import write_text

    write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
