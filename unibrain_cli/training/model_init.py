"""The unified model, its autoencoder and its tokenizer for the model stages (sa, draft, unified, und, dhs).

Where a model stage starts from (:func:`load_bundle`):

1. the export of the latest earlier MODEL stage of the run (``RUN/<sa|unified|dhs>/final``, a
   ``save_pretrained`` folder: model, ``ae.safetensors``, ``tokenizer.json``), else
2. ``train.init_from``: a BAGEL-7B-MoT folder (via ``load_bagel_folder``) or a
   ``save_pretrained`` folder; its llm / vit / latent layout must equal ``recipe.model``'s, else
3. a fresh model from ``recipe.model`` (initialised under ``torch.manual_seed(train.seed)``, so
   every run of a recipe starts from the same weights).

The autoencoder of a first model stage: the ``vae`` stage's export when the run has one
(``load_trained_vae``; its fitted ``scale_factor`` / ``shift_factor`` replace ``model.vae``'s),
else the init folder's ``ae.safetensors``. The model's ``config.vae`` is set to the autoencoder's
config, so ``save_pretrained`` writes a matching pair.

The tokenizer of a first model stage: the init folder's ``tokenizer.json`` when it has one;
else ``model.tokenizer == "qwen2"`` loads ``model.tokenizer_path``; ``"bpe"`` trains a byte-level
BPE (:func:`train_bpe`, ``llm.vocab_size`` entries at most, deterministic) on the train split's
texts (2D and 3D findings, global findings, impressions) plus every template phrasing
(:func:`template_corpus`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from unibrain_cli.config.components import ModelConfig, Recipe, VAEConfig
from unibrain_cli.data import templates
from unibrain_cli.data.tokenizer import TextTokenizer, train_bpe
from unibrain_cli.errors import UserError
from unibrain_cli.modalities import DISEASES, MODALITIES
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import (
    BAGEL_LLM_CONFIG,
    BAGEL_VIT_CONFIG,
    BAGEL_WEIGHTS,
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    VAE_FILE,
    bagel_model_config,
    build_model,
    config_to_dict,
    from_pretrained,
    model_config_from_dict,
)
from unibrain_cli.model.vae import AutoEncoder

#: Stages whose export is a unified-model folder.
MODEL_STAGES: tuple[str, ...] = ("sa", "draft", "unified", "und", "dhs")
#: VAEConfig fields that define the architecture (scale/shift/resolution may differ).
VAE_ARCH_FIELDS: tuple[str, ...] = ("in_channels", "ch", "ch_mult", "num_res_blocks", "z_channels")
#: ModelConfig fields a loaded model must share with the recipe.
LAYOUT_FIELDS: tuple[str, ...] = ("llm", "vit", "latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side")


@dataclass
class ModelBundle:
    """A model stage's starting point: model (train mode off), autoencoder, tokenizer and origin."""

    model: UniBrainModel
    vae: AutoEncoder
    tokenizer: TextTokenizer
    source: str


def previous_model_export(inputs: Mapping[str, Path]) -> Path | None:
    """Export folder of the latest earlier model stage in ``inputs`` (stage name -> folder), or None."""
    found = None
    for name, path in inputs.items():
        if name in MODEL_STAGES:
            found = path
    return found


def _is_model_folder(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() or (path / BAGEL_WEIGHTS).is_file()


def check_sources(recipe: Recipe, inputs: Mapping[str, Path]) -> None:
    """Cheap UserError checks of where the first model stage starts from (see the module docstring).

    Only folders of stages that already finished (exist) are looked at.
    """
    if previous_model_export(inputs) is not None:
        return
    init = recipe.train.init_from
    if init:
        path = Path(init)
        if not path.is_dir() or not _is_model_folder(path):
            raise UserError("not a model folder (expected model.safetensors + config.json, or a BAGEL-7B-MoT folder "
                            "with ema.safetensors)", "train.init_from")
    if init:
        bad = _layout_mismatch(init_config(Path(init)), recipe.model)
        if bad:
            raise UserError("train.init_from holds a model of another shape than the recipe's: " + "; ".join(bad[:8]),
                            "train.init_from")
    vae_dir = inputs.get("vae")
    if vae_dir is None and not (init and (Path(init) / VAE_FILE).is_file()):
        raise UserError("the model stages need an autoencoder: list the vae stage before them in train.stages, or "
                        "set train.init_from to a folder with ae.safetensors", "train.stages")
    if recipe.model.tokenizer == "qwen2" and not (init and (Path(init) / TOKENIZER_FILE).is_file()):
        tok = recipe.model.tokenizer_path
        if not tok or not (Path(tok) / TOKENIZER_FILE).is_file():
            raise UserError("model.tokenizer = 'qwen2' needs model.tokenizer_path, a folder with tokenizer.json",
                            "model.tokenizer_path")


def init_config(path: Path) -> ModelConfig:
    """The model config of a model folder from its JSON files only (ours or BAGEL's)."""
    import json

    def read(name: str) -> dict:
        try:
            return json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {name} ({exc})", str(path / name)) from exc

    try:
        if (path / MODEL_FILE).is_file():
            return model_config_from_dict(read(CONFIG_FILE)["model"])
        return bagel_model_config(read(BAGEL_LLM_CONFIG), read(BAGEL_VIT_CONFIG))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"not a readable model config ({exc})", str(path)) from exc


def _vae_arch_mismatch(a: VAEConfig, b: VAEConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)!r} != {getattr(b, f)!r}" for f in VAE_ARCH_FIELDS if getattr(a, f) != getattr(b, f)]


def adopt_config(model: UniBrainModel, cfg: ModelConfig) -> UniBrainModel:
    """Give a loaded model the run's config (same layout; runtime fields and vae factors from ``cfg``;
    ``aligned_context = "on"`` adds the zero-initialised aligned path to a model without it, e.g. a
    BAGEL-7B-MoT folder; ``fused_view = "on"`` adds a fresh fused-view embedding likewise)."""
    try:
        model.set_aligned_context(cfg.aligned_context, cfg.aligned_window, cfg.aligned_gain, cfg.aligned_draft,
                                  cfg.aligned_draft_resolution)
    except ValueError as exc:
        raise UserError(f"{exc}: use the checkpoint's model.aligned_window / aligned_gain / aligned_draft / "
                        "aligned_draft_resolution, "
                        "or start from an earlier stage") from exc
    model.set_fused_view(cfg.fused_view)
    model.config = cfg
    model.language_model.model.activation_checkpointing = cfg.activation_checkpointing
    return model


def _layout_mismatch(loaded: ModelConfig, wanted: ModelConfig) -> list[str]:
    a, b = config_to_dict(loaded), config_to_dict(wanted)
    out = []
    for f in LAYOUT_FIELDS:
        if a[f] != b[f]:
            if isinstance(a[f], dict):
                out += [f"model.{f}.{k}: {a[f][k]!r} != {b[f].get(k)!r}" for k in a[f] if a[f][k] != b[f].get(k)]
            else:
                out.append(f"model.{f}: {a[f]!r} != {b[f]!r}")
    return out


@torch.no_grad()
def fresh_model(cfg: ModelConfig, seed: int) -> UniBrainModel:
    """A newly initialised model whose weights depend only on ``cfg`` and ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg)


def load_bundle(recipe: Recipe, inputs: Mapping[str, Path], data_dir: Path) -> ModelBundle:
    """Build the starting model, autoencoder and tokenizer of a model stage (module docstring)."""
    prev = previous_model_export(inputs)
    if prev is not None:
        pre = from_pretrained(prev)
        if pre.vae is None or pre.tokenizer_dir is None:
            raise UserError("model export lacks ae.safetensors or tokenizer.json; re-run that stage", str(prev))
        return ModelBundle(adopt_config(pre.model, dataclasses.replace(recipe.model, vae=pre.config.vae)),
                           pre.vae, load_tokenizer(recipe, inputs, data_dir), f"stage export {prev}")
    check_sources(recipe, inputs)
    init = Path(recipe.train.init_from) if recipe.train.init_from else None
    pre = from_pretrained(init) if init is not None else None
    # autoencoder
    if "vae" in inputs:
        from unibrain_cli.training.stages.vae import load_trained_vae

        vae = load_trained_vae(inputs["vae"])
        where = str(inputs["vae"])
    else:
        assert pre is not None and pre.vae is not None, "check_sources guarantees an autoencoder"
        vae, where = pre.vae, str(init)
    bad = _vae_arch_mismatch(vae.config, recipe.model.vae)
    if bad:
        raise UserError("the autoencoder does not match model.vae: " + "; ".join(bad), where)
    cfg = dataclasses.replace(recipe.model, vae=vae.config)
    # model
    if pre is not None:
        model = adopt_config(pre.model, cfg)  # stored dtype kept (BAGEL: bf16); the trainer decides
        source = f"init_from {init}"
    else:
        model = fresh_model(cfg, recipe.train.seed)
        source = "fresh initialisation"
    return ModelBundle(model.eval(), vae.float().eval(), load_tokenizer(recipe, inputs, data_dir), source)


def load_tokenizer(recipe: Recipe, inputs: Mapping[str, Path], data_dir: Path) -> TextTokenizer:
    """The tokenizer of a model stage without building the model (see the module docstring)."""
    prev = previous_model_export(inputs)
    init = Path(recipe.train.init_from) if recipe.train.init_from else None
    if prev is not None:
        tok = TextTokenizer.load(prev)
    elif init is not None and (init / TOKENIZER_FILE).is_file():
        tok = TextTokenizer.load(init)
    elif recipe.model.tokenizer == "qwen2":
        tok = TextTokenizer.load(recipe.model.tokenizer_path)
    else:
        tok = bpe_tokenizer(data_dir, recipe.model.llm.vocab_size)
    if tok.vocab_size > recipe.model.llm.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but model.llm.vocab_size is "
                        f"{recipe.model.llm.vocab_size}", "model.llm.vocab_size")
    return tok


# ---------------------------------------------------------------------------------------------
# BPE corpus
# ---------------------------------------------------------------------------------------------


def template_corpus() -> Iterator[str]:
    """Every template phrasing, filled with every modality (pair) and disease phrase (fixed order)."""
    for target in MODALITIES:
        for source in MODALITIES:
            if source == target:
                continue
            inputs = templates.inputs_phrase([source])
            tgt = templates.target_phrase(target)
            for t in templates.INSTRUCTION_TEMPLATES + templates.PLANNING_TEMPLATES:
                yield t.format(inputs=inputs, target=tgt)
    for m in MODALITIES:
        for t in templates.RECONSTRUCTION_PROMPTS:
            yield t.format(image=f"{templates.DISPLAY_NAMES[m]} image")
    for questions in templates.QUESTIONS.values():
        yield from questions
    for d in (*DISEASES, "glioma and metastasis"):
        phrase = templates.diagnosis_phrase(d.split(" and "))
        yield templates.format_answer("both", "no acute abnormality", phrase)
    yield templates.format_answer("diagnosis", "", templates.NO_DISEASE_PHRASE)


def report_corpus(data_dir: Path) -> Iterator[str]:
    """Report texts of the train split of a slices folder (index order)."""
    import json

    from unibrain_cli.data.slices_data import SliceDataset

    ds = SliceDataset(data_dir, split="train")
    cols = [c for c in ("findings_2d", "findings_3d", "global_finding_2d", "global_finding", "impression")
            if c in ds.index.columns]
    for row in ds.index[cols].itertuples(index=False):
        for col, value in zip(cols, row, strict=True):
            if not isinstance(value, str) or not value:
                continue
            if col.startswith("findings"):
                try:
                    found = json.loads(value)
                except json.JSONDecodeError:
                    continue
                if isinstance(found, dict):
                    yield from (str(v) for v in found.values() if v)
            else:
                yield value


def bpe_tokenizer(data_dir: Path, vocab_size: int) -> TextTokenizer:
    """Byte-level BPE of at most ``vocab_size`` ids on the train reports + templates (deterministic)."""
    texts = list(report_corpus(data_dir)) + list(template_corpus())
    return train_bpe(texts, vocab_size)
