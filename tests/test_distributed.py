"""Two CPU processes (gloo DDP through torchrun + Accelerate): ranks stay in sync, each rank has its
own generator, and only the main process writes the run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_baselines import write_slices

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from unibrain_cli.config import load_recipe
    from unibrain_cli.training.run import train

    slices, run, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    recipe = load_recipe("tiny", ["train.stages=[{name='vae', steps=3, lr=2e-3, batch_size=2}]",
                                  "train.checkpoint_every=2", "train.log_every=1"])

    def hook(info):
        if info.step == info.total:
            params = {k: v.detach().double() for k, v in info.model.named_parameters()}
            record = {"rank": info.rank, "checksum": sum(float(v.sum()) for v in params.values()),
                      "abs": sum(float(v.abs().sum()) for v in params.values()), "loss": info.loss}
            (out / f"rank{info.rank}.json").write_text(json.dumps(record))

    train(recipe, slices, run, hooks=[hook])
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path: Path) -> None:
    slices = write_slices(tmp_path / "SLICES", n_cases=8)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    # torchrun + ACCELERATE_USE_CPU: Accelerate's MULTI_CPU (gloo) mode; `accelerate launch --cpu`
    # starts a single process. On GPUs `accelerate launch --num_processes N` is the same code path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(slices), str(tmp_path / "RUN"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["abs"] == ranks[1]["abs"]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank saw its own data
    run = tmp_path / "RUN"
    state = json.loads((run / "vae" / "checkpoint-3" / "state.json").read_text())
    assert state["world_size"] == 2 and state["position"] == 3
    rng = load_file(str(run / "vae" / "checkpoint-3" / "rng.safetensors"))
    assert not torch.equal(rng["generator.rank0"], rng["generator.rank1"])
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # main process only: three train lines and the eval line
    assert (run / "vae" / "final" / "ae.safetensors").is_file()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
