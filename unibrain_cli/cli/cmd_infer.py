"""Shared options of `impute`, `diagnose`, `report` and `evaluate` (inputs, checkpoint, sampler)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from unibrain_cli.model.memory import MemoryOptions

HAVE = typer.Option(None, "--have", help="Input files: t1=path.nii.gz,t2=path.nii.gz.")
CASE = typer.Option(None, "--case", help="A folder whose files are recognised by modality aliases.")
PREPARED = typer.Option(None, "--prepared", help="A PREPARED folder (use with --case-id).")
CASE_ID = typer.Option(None, "--case-id", help="Case id inside --prepared.")
CKPT = typer.Option(None, "--ckpt", help="A training run folder or a save_pretrained folder.")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")
SEED = typer.Option(0, "--seed", help="Random seed of the sampler.")
STEPS = typer.Option(None, "--steps", min=1, help="Euler steps of the image sampler (default: the recipe's "
                     "flow.sample_steps).")

PROTOCOL = typer.Option("auto", "--protocol", help="native (our checkpoints), released (the authors' released "
                        "UniBrain / BAGEL-7B-MoT weights, run with exactly their protocol) or auto (released for a "
                        "folder in their layout: ema.safetensors or model.safetensors without our config.json).")
BASE = typer.Option(None, "--base", help="With --protocol released: a BAGEL-7B-MoT folder giving the configs, "
                    "tokenizer and ae.safetensors that an authors' step folder (e.g. checkpoints_s3/0000200) lacks.")

DTYPE = typer.Option("auto", "--dtype", help="Compute dtype of the model: auto (fp32 on the CPU, bf16 on CUDA), "
                     "bf16 or fp32.")
QUANTIZE = typer.Option("none", "--quantize", help="Quantise the decoder layers' weights: none, int8 (weight-only, "
                        "torchao; CPU or CUDA) or nf4 (bitsandbytes; CUDA only).")
OFFLOAD = typer.Option("none", "--offload", help="Keep the decoder layers' weights out of device memory: none, cpu "
                       "(CUDA: held in CPU memory, copied to the GPU as each layer runs) or disk (each layer read "
                       "from the checkpoint file just before it runs and dropped after; CPU or CUDA).")


def memory_flags(dtype: str | None, quantize: str | None, offload: str | None, device: str) -> MemoryOptions:
    """Parse ``--dtype`` / ``--quantize`` / ``--offload`` and check them against ``--device`` before any
    input is read or output written (UserError naming the flag)."""
    from unibrain_cli.inference.checkpoint import resolve_memory
    from unibrain_cli.model.memory import memory_options

    opts = memory_options(dtype, quantize, offload)
    if not opts.is_default:
        resolve_memory(device, opts)
    return opts


__all__ = ["HAVE", "CASE", "PREPARED", "CASE_ID", "CKPT", "DEVICE", "SEED", "STEPS", "PROTOCOL", "BASE", "DTYPE",
           "QUANTIZE", "OFFLOAD", "memory_flags", "Path"]
