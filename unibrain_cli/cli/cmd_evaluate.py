"""`unibrain evaluate`: the paper's Tables 1-3 on a prepared split, with baselines and figures."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.cmd_infer import BASE, DEVICE, PROTOCOL, SEED, STEPS
from unibrain_cli.cli.common import STATE, command, out, print_table


def evaluate(
    ckpt: Path | None = typer.Option(None, "--ckpt", help="Training run folder or save_pretrained folder "
                                     "(with --ablation: a folder holding A/, B/, C/ and full/ runs; with --protocol "
                                     "released: the released / BAGEL folder, or a step folder with --base)."),
    data: Path | None = typer.Option(None, "--data", help="SLICES folder from `unibrain slice`."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    scenario: str = typer.Option("all", "--scenario", help="t1, t1_t2, t1_t2_flair, complete or all (comma list)."),
    chain: bool = typer.Option(False, "--chain", help="Also run the imputation chains (Table 2; released: their "
                               "generation task, and their unified chain for the Table-1 UniBrain rows)."),
    ensemble: int = typer.Option(1, "--ensemble", min=1, help="Seed ensemble size for imputation (released: their "
                                 "sample_time, N draws averaged as uint8)."),
    ablation: bool = typer.Option(False, "--ablation", help="Run the Table 3 ablation variants."),
    ratescore_models: Path | None = typer.Option(None, "--ratescore-models", help="Local RaTEScore models."),
    baselines: str = typer.Option("copy", "--baselines", help="Baselines, comma-separated: copy, unet, two-stage "
                                  "(Table 2), cnn (a supervised CNN classifier per scenario, Table 1) or none "
                                  "(released: copy,unet)."),
    unet_steps: int = typer.Option(200, "--unet-steps", min=1, help="Training steps of each chain U-Net."),
    cnn_steps: int = typer.Option(1000, "--cnn-steps", min=1, help="Training steps of each scenario's CNN "
                                  "(--baselines cnn)."),
    max_cases: int = typer.Option(0, "--max-cases", min=0, help="Evaluate a seeded subset of N cases (0 = all)."),
    eval_slices: str = typer.Option("eval", "--eval-slices", help="Slices scored per case: eval (the case's eval "
                                    "slice; the default) or all (every stored slice of the case; a case's score is "
                                    "the mean over its slices, n and the bootstrap stay per case; native protocol "
                                    "with --convention ours only)."),
    thinking_tokens: int | None = typer.Option(None, "--thinking-tokens", min=0, help="Bound on each thinking "
                                               "text (default 48; released: their max_length, default 800)."),
    thinking_plan: str | None = typer.Option(None, "--thinking-plan", help="Planning sentence that opens each "
                                             "thinking text: generated (by the model) or forced (the data flow's "
                                             "template; the model writes the findings after it). Default: the "
                                             "recipe's flow.thinking_plan. Native protocol only."),
    answer_tokens: int | None = typer.Option(None, "--answer-tokens", min=0, help="Bound on the generated answer "
                                             "(default 96; released: their max_length, default 512)."),
    seed: int = SEED,
    steps: int | None = STEPS,
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Slices generated together over "
                                          "batched KV caches (default 16; 1 = one by one; same results up to float "
                                          "rounding). Native protocol only."),
    cfg_img_scale: float | None = typer.Option(None, "--cfg-img-scale", help="Image guidance scale of the "
                                               "sampler (default: the recipe's flow.cfg_img_scale; 1 = off)."),
    convention: str | None = typer.Option(None, "--convention", help="Metric convention: ours (eval slice, "
                                          "brain-cropped float [0, 1], also inside the brain; the default) or paper "
                                          "(the authors': middle lesion slice, uint8/255 whole slice, last target of "
                                          "each chain; the default with --protocol released; see eval.json)."),
    protocol: str = PROTOCOL,
    base: Path | None = BASE,
    device: str = DEVICE,
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Evaluation output folder (empty unless --force)."),
    force: bool = typer.Option(False, "--force", help="Allow a non-empty --out (it is replaced)."),
) -> None:
    """Evaluate diagnosis, report generation and imputation like the paper's tables.

    Example: unibrain evaluate --ckpt run/ --data slices/ --split test --scenario all --chain --out eval/

    The authors' released checkpoint with their protocol (Table 2 by their generation task, paper convention):
    unibrain evaluate --ckpt checkpoints_s3/0000200 --base BAGEL-7B-MoT --protocol released --data slices/
    --chain --out eval/
    """
    from rich.markup import escape
    from rich.text import Text

    from unibrain_cli.evaluation.runner import convention_line, eval_slices_line, to_rich
    from unibrain_cli.evaluation.runner import evaluate as run_evaluate

    result = run_evaluate(ckpt, data, out_dir, split=split, scenarios=scenario, chain=chain, ensemble=ensemble,
                          ablation=ablation, ratescore_models=ratescore_models, baselines=baselines,
                          unet_steps=unet_steps, cnn_steps=cnn_steps, max_cases=max_cases, seed=seed, steps=steps,
                          device=device, progress=not STATE.quiet, force=force, thinking_tokens=thinking_tokens,
                          answer_tokens=answer_tokens, cfg_img_scale=cfg_img_scale,
                          convention=convention.lower() if convention is not None else None, protocol=protocol,
                          base=base, batch_size=batch_size, eval_slices=eval_slices.lower(),
                          thinking_plan=thinking_plan.lower() if thinking_plan is not None else None)
    for table in result.tables.values():
        print_table(to_rich(table))
    print_table(Text(convention_line(result.summary["convention"])))
    all_slices = result.summary.get("eval_slices") == "all"  # the released protocol's summary has no such key
    if all_slices:
        print_table(Text(eval_slices_line(result.summary["slices"], result.summary["cases"])))
    for line in result.summary["convention"].get("differences", []):
        out(f"  differs from the authors' protocol: {escape(line)}")
    per_case = result.summary["seconds"]["per_case_mean"]
    what = f"{result.summary['cases']} case(s)" + (f" ({result.summary['slices']} slices)" if all_slices else "")
    out(f"[green]evaluated[/] {what}, {per_case or 0:.1f} s per case -> {result.out}")
    for name, path in result.figures.items():
        out(f"  {name}: {path}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(command(evaluate))
