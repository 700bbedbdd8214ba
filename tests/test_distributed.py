"""Two CPU processes (gloo DDP through torchrun + Accelerate): ranks stay in sync, each rank has its
own generator, and only the main process writes the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slices_helpers import write_slices

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


def run_two_ranks(script: Path, *args: str) -> list[dict]:
    """Run ``script`` on 2 CPU ranks (torchrun + ACCELERATE_USE_CPU: Accelerate's MULTI_CPU gloo
    mode; ``accelerate launch --cpu`` would start a single process; on GPUs ``accelerate launch
    --num_processes N`` is the same code path). The script writes ``OUT/rank{r}.json``; ``args[-1]``
    is OUT. Returns both ranks' records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # --standalone: the launcher binds its own free port (no race with a port picked beforehand)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads((Path(args[-1]) / f"rank{r}.json").read_text()) for r in range(2)]


def train_on_two_ranks(tmp_path: Path, script_text: str) -> list[dict]:
    """Write 8 cases of slices and ``script_text``, run it on two ranks (args: SLICES RUN OUT)."""
    slices = write_slices(tmp_path / "SLICES", n_cases=8)
    script = tmp_path / "train_script.py"
    script.write_text(script_text)
    out = tmp_path / "out"
    out.mkdir()
    return run_two_ranks(script, str(slices), str(tmp_path / "RUN"), str(out))


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path: Path) -> None:
    ranks = train_on_two_ranks(tmp_path, SCRIPT)
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


GLOBAL_NORM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env
    from torch import nn
    from unibrain_cli.config import load_recipe
    from unibrain_cli.training.stages import StageContext, StageTask, StepOutput
    from unibrain_cli.training.trainer import run_stage

    COUNTS = {(0, 0): (2, 9), (0, 1): (11, 1), (1, 0): (5, 3), (1, 1): (1, 20)}  # (rank, position): (a, b)

    def toy_batch(rank, position):
        n_a, n_b = COUNTS[(rank, position)]
        g = torch.Generator().manual_seed(100 * rank + position)
        return {"xa": torch.randn(n_a, 4, generator=g), "xb": torch.randn(n_b, 4, generator=g)}

    def sums(model, batch):  # two per-token terms: sum over the micro-batch's tokens
        a = (model(batch["xa"]) - batch["xa"].sum(1, keepdim=True)).square().sum()
        b = (model(batch["xb"]) + 1.0).abs().sum()
        return {"a": a, "b": b}

    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    class TokenStage(StageTask):
        name = "sa"
        def build_model(self): return fresh()
        def next_batch(self, position, generator): return toy_batch(self.ctx.rank, position % 2)
        def loss_counts(self, batch): return {"a": len(batch["xa"]), "b": len(batch["xb"])}
        def loss(self, model, batch, norm=None):
            s = sums(model, batch)
            terms = {k: s[k] / norm[k] for k in s}
            return StepOutput(terms["a"] + terms["b"], {k: float(v.detach()) for k, v in terms.items()}, 1)
        def export(self, model, out_dir): (out_dir / "ok.json").write_text("{}")

    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() decides (run.py)
    recipe = load_recipe("tiny", ["train.stages=[{name='sa', steps=1, lr=0.1, grad_accum=2}]",
                                  "train.checkpoint_every=100", "train.log_every=1"])
    grads, infos = [], []
    original = Accelerator.clip_grad_norm_
    def spy(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        grads.append([p.grad.detach().clone() for p in parameters])
        return original(self, parameters, max_norm, norm_type)
    Accelerator.clip_grad_norm_ = spy
    ctx = StageContext(recipe, recipe.train.stages[0], 0, run, run, {}, state.process_index, state.num_processes)
    run_stage(TokenStage(ctx), hooks=[infos.append])
    # by hand: every token of the step (both ranks, both micro-batches) over the global counts
    model = fresh()
    batches = [toy_batch(r, p) for r in range(2) for p in range(2)]
    total = {"a": sum(len(b["xa"]) for b in batches), "b": sum(len(b["xb"]) for b in batches)}
    parts = [sums(model, b) for b in batches]
    means = {k: float(sum(s[k] for s in parts)) / total[k] for k in total}
    loss = sum(s["a"] / total["a"] + s["b"] / total["b"] for s in parts)
    want = torch.autograd.grad(loss, list(model.parameters()))
    err = max(float((g - w).abs().max()) for g, w in zip(grads[0], want))
    record = {"rank": state.process_index, "err": err, "scale": max(float(w.abs().max()) for w in want),
              "checksum": sum(float(g.double().sum()) for g in grads[0]), "terms": infos[0].terms,
              "means": means}
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record))
    """
)


def test_two_process_losses_use_the_global_token_counts(tmp_path: Path) -> None:
    """grad_accum 2 x 2 ranks with very different token counts per micro-batch: the synchronised
    gradient is that of (sum of all token losses of the step) / (global count), per term."""
    script = tmp_path / "norm_train.py"
    script.write_text(GLOBAL_NORM_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    ranks = run_two_ranks(script, str(tmp_path / "RUN"), str(out))
    for rec in ranks:
        assert rec["scale"] > 1e-2 and rec["err"] < 1e-5, rec
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    for k, mean in ranks[0]["means"].items():  # the logged terms (averaged over ranks): per-token means of the step
        assert (ranks[0]["terms"][k] + ranks[1]["terms"][k]) / 2 == pytest.approx(mean, rel=1e-5)


DHS_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from unibrain_cli.config import load_recipe
    from unibrain_cli.training.run import train

    slices, run, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    recipe = load_recipe("tiny", ["train.stages=[{name='vae', steps=1, batch_size=2}, "
                                  "{name='dhs', steps=2, lr=1e-3, dhs_rollout_steps=2}]",
                                  "train.checkpoint_every=100", "train.log_every=1"])

    def hook(info):
        if info.stage == "dhs" and info.step == info.total:
            params = {k: v.detach().double() for k, v in info.model.named_parameters()}
            record = {"rank": info.rank, "checksum": sum(float(v.sum()) for v in params.values()),
                      "loss": info.loss, "terms": info.terms}
            (out / f"rank{info.rank}.json").write_text(json.dumps(record))

    train(recipe, slices, run, hooks=[hook])
    """
)


def test_two_process_dhs_stage_trains_in_sync(tmp_path: Path) -> None:
    """The dhs stage through the trainer on 2 CPU ranks (DDP: Accelerate has no FSDP on CPU, see the
    FSDP test below), each rank rolling out its own samples."""
    ranks = train_on_two_ranks(tmp_path, DHS_DDP_SCRIPT)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert all(r["terms"]["flow"] > 0 for r in ranks)
    assert (tmp_path / "RUN" / "dhs" / "final" / "model.safetensors").is_file()


#: The DHS module under torch FSDP (gloo, CPU; Accelerate only enables FSDP on accelerators, so the
#: module is wrapped by hand with the trainer's policy: every ``layers`` class is a unit). The ranks'
#: rollouts have different pass counts (rank 0: one slot; rank 1: two slots, one context chunk
#: without a ViT image); without the padding the ViT / decoder all-gathers of the ranks mismatch.
DHS_FSDP_SCRIPT = """import copy, json, sys
from datetime import timedelta
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from unibrain_cli.config import load_recipe
from unibrain_cli.flow.sampler import timestep_schedule
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.materialize import ImageGeometry, ImageItem, TextItem, build_batch
from unibrain_cli.training.model_init import fresh_model
from unibrain_cli.training.parallel import layer_lists
from unibrain_cli.training.stages.dhs import DHSTrainModule

STEPS = 2
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
out = Path(sys.argv[-1])
recipe = load_recipe("tiny")
cfg = recipe.model
geom = ImageGeometry.from_config(cfg, recipe.data.image_size)
model = fresh_model(cfg, seed=0)
with torch.no_grad():
    model.llm2vae.weight.copy_(0.05 * torch.randn(model.llm2vae.weight.shape, generator=torch.Generator().manual_seed(5)))
torch.manual_seed(1)
module = DHSTrainModule(model, AutoEncoder(cfg.vae).eval(), geom, 1.0, 1.0, rollout_steps=STEPS, sample_shift=3.0)
module.vae.requires_grad_(False)

def text(n, loss, role, start=10):
    return TextItem((1, *range(start, start + n), 2), loss, role)

sched = timestep_schedule(STEPS, 3.0)
gen = torch.Generator().manual_seed(10 + rank)
if rank == 0:  # one generation slot: 1 prefill + STEPS passes
    samples = [[ImageItem("vit", False, 0), ImageItem("vae", False, 0), text(4, False, "instruction"),
                ImageItem("vae", True, 1, 0), ImageItem("vae", False, 1, 0), text(3, True, "answer", 40)]]
    n_img, exits, sa = 2, [1], [False]
else:  # two generation slots, text-only context chunk between them, + an SA sample
    samples = [[ImageItem("vae", False, 0), ImageItem("vit", False, 0), text(3, False, "instruction"),
                ImageItem("vae", True, 1, 0), ImageItem("vae", False, 1, 0), text(5, True, "thinking", 60),
                ImageItem("vae", True, 2, 1), text(9, True, "answer", 100)],
               [ImageItem("vit", False, 3), text(5, False, "instruction", 200), ImageItem("vae", True, 3, 2, sa=True)]]
    n_img, exits, sa = 4, [0, 1, -1], [False, False, True]
exits = torch.tensor(exits)
times = torch.where(exits >= 0, sched[exits.clamp(min=0)], torch.tensor(0.4))
pixels = torch.rand((n_img, geom.image_size, geom.image_size), generator=gen)
noise = torch.randn((len(exits), geom.vae_image_tokens, geom.latent_dim), generator=gen)
batch = build_batch(samples, pixels, geom, (3, 4), times, noise, exit_steps=exits)

reference = copy.deepcopy(module)
with torch.no_grad():
    ref = reference(batch)
classes = {type(layer) for _, layers in layer_lists(module) for layer in layers}
wrapped = FSDP(module, auto_wrap_policy=ModuleWrapPolicy(classes), device_id=torch.device("cpu"), use_orig_params=True)
calls = {"llm": 0, "vit": 0}
module.model.language_model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("llm", calls["llm"] + 1))
module.model.vit_model.vision_model.encoder.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__("vit", calls["vit"] + 1))
res = wrapped(batch)
res["loss"].backward()
grad = sum(float(p.grad.abs().sum()) for p in wrapped.parameters() if p.grad is not None)  # this rank's shard
rec = {"rank": rank, "own": module.planned_passes(batch), "calls": calls, "grad": grad,
       **{k: float(res[k].detach()) for k in ("loss", "ntp", "flow", "sa")},
       **{"ref_" + k: float(ref[k]) for k in ("loss", "ntp", "flow", "sa")}}
(out / f"rank{rank}.json").write_text(json.dumps(rec))
# both ranks finish every collective before either tears the group down (a rank that left early
# once aborted its peer: "terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
"""


def test_two_process_fsdp_dhs_pads_the_rollout(tmp_path: Path) -> None:
    script = tmp_path / "dhs_fsdp.py"
    script.write_text(DHS_FSDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    ranks = run_two_ranks(script, str(out))
    assert ranks[0]["own"] != ranks[1]["own"]  # different rollouts ...
    top = max(r["own"] for r in ranks)
    for rec in ranks:  # ... the same layer forwards: max rollout passes + the packed training forward
        assert rec["calls"] == {"llm": top + 1, "vit": top + 1}, rec
        for k in ("loss", "ntp", "flow", "sa"):  # and the losses of the unsharded module
            assert rec[k] == pytest.approx(rec["ref_" + k], rel=1e-5, abs=1e-7), (k, rec)
        assert rec["grad"] > 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
