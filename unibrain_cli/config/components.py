"""Frozen dataclass configs, one per component. TOML recipes are their serialisation.

Each component receives only its own config. Shapes and units are stated per field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AttentionBackend = Literal["auto", "sdpa", "flex", "flash"]
StageName = Literal["vae", "sa", "draft", "unified", "und", "dhs"]
ThinkingPlan = Literal["generated", "forced"]  # flow.thinking_plan
STAGE_ORDER: tuple[str, ...] = ("vae", "sa", "draft", "unified", "und", "dhs")
#: the image axes each view of the draft bank flips (``data.draft_views`` takes the first 2 or 4):
#: the slice, left-right, up-down, both
DRAFT_VIEW_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
DRAFT_VIEWS = (2, 4)


@dataclass(frozen=True)
class DataConfig:
    """2D training data: slice size and which modalities the model knows."""

    image_size: int = 64  # square slice side in pixels (1 mm in-plane before resize)
    modalities: tuple[str, ...] = ("t1", "t2", "flair", "t1ce", "dwi", "adc")
    slices_per_case: int = 3  # lesion slices kept per case by `slice` in recipes' demos
    max_text_tokens: int = 256  # truncation of one text segment, in tokens
    text_dropout: float = 0.1  # conditioning dropout of instruction text
    visual_dropout: float = 0.3  # conditioning dropout of clean context images
    understanding_only_prob: float = 0.15  # samples whose images enter as ViT only
    thinking_prob: float = 0.7  # samples with "thinking" text before each target
    generation_thinking_prob: float = 0.7  # the same for generation-only samples (no Q&A tail)
    # generation-only samples whose context holds NO image (inputs and generated targets' clean
    # views all removed): the branch that image guidance (flow.cfg_img_scale) queries at inference
    image_free_prob: float = 0.0
    generation_only_prob: float = 0.25  # task probabilities (remaining mass: impression/diagnosis/both)
    impression_prob: float = 0.25
    diagnosis_prob: float = 0.25
    findings_prob: float = 0.3  # answer samples that first answer one modality's findings question
    pack_tokens: int = 2048  # token budget of one packed sequence
    # noisy copies of every generated target in `unified` samples, each with its own noise and flow
    # time (invisible to each other and to later tokens): more flow signal per context token
    flow_draws: int = 1
    # samples whose modalities keep the canonical order of `unibrain_cli.modalities.MODALITIES`
    # (inputs = a prefix, targets the next ones: the order `impute`/`evaluate` generate in)
    # instead of a random permutation; 0 = the paper's fully random order
    canonical_order_prob: float = 0.0
    # with model.aligned_draft > 0: (context -> target) latent pairs per `unified` step on which the
    # draft network is regressed (train slices drawn like the data flow's orders; model/aligned.py)
    draft_pairs: int = 0
    # probability that a draft pair is a mirrored view of its slice (the bank then also holds the
    # views' latents, each encoded as such; 0 = no mirroring, no extra random draw)
    draft_flip_prob: float = 0.0
    # the views: 2 = the slice and its left-right mirror; 4 = also its up-down mirror and both (the
    # rotation by 180 degrees), a mirrored pair then one of the three uniformly
    draft_views: int = 2
    # `und` stage: probability that an understanding sample is mirrored left-right (every image of
    # it, and "left" / "right" swapped in its text: :func:`unibrain_cli.data.dataflow.mirror_plan`);
    # 0 = no mirroring, no extra random draw
    understanding_flip_prob: float = 0.0
    # `und` stage: probability that an understanding sample shows every present modality (in random
    # order) instead of a random-size subset; 0 = always a subset, no extra random draw
    understanding_all_prob: float = 0.0
    # `und` stage: a random similarity transform of every understanding sample (all its images alike,
    # bilinear, zero outside the slice): rotation uniform in +-understanding_rotate_deg degrees, shift
    # uniform in +-understanding_shift_px pixels per axis, scale exp(uniform +-log(1 + understanding_scale)).
    # All 0 = the stored slices, no extra random draw
    understanding_rotate_deg: float = 0.0
    understanding_shift_px: float = 0.0
    understanding_scale: float = 0.0


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2-style decoder shared by both MoT experts."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 1024
    qk_norm: bool = True
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP-style NaViT encoder for the understanding path (inputs: 3 channels)."""

    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    max_patches_per_side: int = 16  # learned position table side (SigLIP-so400m: 70)
    # Channels of a patch-local convolutional stem before ``patch_embedding`` (model/vit.py,
    # :class:`PatchStem`): empty = SigLIP's linear patch embedding exactly (BAGEL); each entry one
    # 3x3 stride-2 conv -> GroupNorm -> GELU inside every patch, so ``patch_size`` must be a
    # multiple of ``2 ** len(stem_widths)``.
    stem_widths: tuple[int, ...] = ()


@dataclass(frozen=True)
class VAEConfig:
    """FLUX-architecture KL autoencoder (generation path)."""

    in_channels: int = 3
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 4
    scale_factor: float = 1.0  # latent z = scale_factor * (z_raw - shift_factor)
    shift_factor: float = 0.0
    resolution: int = 64  # nominal training resolution (informative only)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """The unified BAGEL-architecture model."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2  # latent tokens are (p x p x z_channels) patches
    max_latent_size: int = 16  # side of the 2D sin-cos latent position table (BAGEL: 64)
    vit_max_num_patch_per_side: int = 16  # side of the connector's 2D sin-cos table (BAGEL: 70)
    timestep_freq_dim: int = 256  # sinusoidal features of t in [0, 1] (no x1000)
    connector_act: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    # "1d": BAGEL's RoPE (every token of an image shares one position). "2d": additionally rotate
    # the lowest-frequency quarter of each head by the token's normalised (row, col) in its image,
    # so position-matched tokens of two images align (text keeps exact 1D RoPE). See model/bagel.py.
    image_rope: Literal["1d", "2d"] = "1d"
    # "off": BAGEL exactly. "on": every noisy target latent token also receives a zero-initialised
    # projection of the same-position clean latents of the sample's earlier images, in fixed
    # per-modality slots with presence bits (model/aligned.py). A small-scale substitute for
    # BAGEL's pretraining, like image_rope = "2d".
    aligned_context: Literal["off", "on"] = "off"
    # odd side of the context neighbourhood the aligned path stacks per slot (1 = same position)
    aligned_window: int = 1
    # fixed factor on the aligned path's output: under Adam a k-fold faster-growing path (model/aligned.py)
    aligned_gain: float = 1.0
    # width of the aligned path's draft network (0 = none): a small convolutional net over the
    # stacked context latents that regresses the target's clean latent (trained on its own loss,
    # data.draft_pairs per step); the aligned projection then also reads this draft (model/aligned.py)
    aligned_draft: int = 0
    # grid of the draft's last layers: "tokens" (four convolutions on the token grid) or "latent"
    # (two on the token grid, then pixel-shuffled by latent_patch_size to the latent grid, where the
    # context's unpatchified latents join them, and three more there; model/aligned.py)
    aligned_draft_resolution: Literal["tokens", "latent"] = "tokens"
    # with a draft: the flow runs from noise to the residual x0 - draft (detached) instead of to x0:
    # noisy tokens embed x_t - (1 - t) draft and the velocity head's output minus the draft is the
    # velocity, so samplers, guidance and dhs see the usual x-space flow (model/bagel.py)
    draft_residual: bool = False
    # "off": BAGEL exactly. "on": before the first question of a sample one more ViT image, the
    # fused view: patch (r, c) stacks patch (r, c) of the sample's earlier ViT views in fixed
    # per-modality slots with presence bits (model/fused.py). The understanding side's
    # counterpart of aligned_context.
    fused_view: Literal["off", "on"] = "off"
    attention_backend: AttentionBackend = "auto"
    tokenizer: Literal["bpe", "qwen2"] = "bpe"
    tokenizer_path: str = ""  # qwen2: local folder with tokenizer files
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class FlowConfig:
    """Rectified flow: training timesteps and the Euler sampler. t in [0, 1], t = 1 is noise."""

    train_timestep_shift: float = 1.0  # s in t' = s t / (1 + (s - 1) t)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sample_steps: int = 10
    sample_timestep_shift: float = 3.0
    cfg_text_scale: float = 1.0  # 1.0 disables text guidance
    cfg_img_scale: float = 1.0  # 1.0 disables image guidance
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance applied for t in this interval
    cfg_renorm_type: Literal["none", "global", "channel", "text_channel"] = "global"
    cfg_renorm_min: float = 0.0
    # inference: the planning sentence that opens each thinking text ("I need to translate the
    # given T1 image into the corresponding T2-weighted MRI.") is generated by the model
    # ("generated", BAGEL / the paper) or given as the data flow's template for the known inputs
    # and the wanted target, the model writing the findings after it ("forced"; README)
    thinking_plan: ThinkingPlan = "generated"


@dataclass(frozen=True)
class StageConfig:
    """One training stage."""

    name: StageName = "unified"
    steps: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    ntp_weight: float = 1.0
    flow_weight: float = 1.0
    dhs_rollout_steps: int = 10  # dhs: few-step diffusion length per generation slot
    kl_weight: float = 1e-6  # vae: KL term weight
    recon_loss: Literal["l1", "mse"] = "l1"  # vae: reconstruction term (l1: LDM/FLUX; mse: what PSNR scores)
    batch_size: int = 8  # vae: images per step; draft: (context -> target) pairs per step


@dataclass(frozen=True)
class TrainConfig:
    """Trainer-wide settings and the ordered stage list."""

    stages: tuple[StageConfig, ...] = (StageConfig(),)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int = 100
    log_every: int = 10
    betas: tuple[float, float] = (0.9, 0.95)
    num_workers: int = 0
    init_from: str = ""  # a BAGEL-7B-MoT folder or a save_pretrained folder to start the first model stage from


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings."""

    scenarios: tuple[str, ...] = ("t1", "t1_t2", "t1_t2_flair", "complete")
    ensemble: int = 1
    bootstrap: int = 1000
    max_cases: int = 0  # 0 = all cases of the split
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """A full run description: one config per component."""

    name: str = "unnamed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
