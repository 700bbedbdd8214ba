"""Shared test setup: deterministic, single-threaded torch; the tiny random checkpoint of the inference
and evaluation tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_determinism():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """Reset Accelerate's process-wide singletons after a test that trained (training tests use it)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random UniBrain model folder (inference.bench.make_random_checkpoint), one per test module."""
    from unibrain_cli.inference.bench import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")
