"""Architecture configs, one dataclass per network, with presets transcribed from the original yaml files.

Presets: ``sd15`` (CompVis v1-inference.yaml), ``sd21-base`` (v2-inference.yaml, 512 px, epsilon),
``sd21`` (v2-inference-v.yaml, 768 px, v-prediction), ``sdxl`` (sgm sd_xl_base.yaml, 1024 px), ``toy`` (the
embedded toy model), ``tiny`` and ``tiny-sdxl`` (random-weight models for tests); ``sd3-medium``,
``sd35-medium``, ``sd35-large`` (Stability's SD3 / SD3.5 releases) and ``tiny-sd3``, after ``MMDiTConfig``;
``flux-dev``, ``flux-schnell``, ``tiny-flux`` and ``tiny-flux-schnell`` (FLUX.1), after ``FluxConfig``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    """LDM ``UNetModel`` hyper-parameters (openaimodel.py names)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int = 8              # SD1: fixed head count ...
    num_head_channels: int = -1     # ... SD2: fixed head width (then num_heads is ignored)
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/out; SD2: linear
    transformer_depth: int | tuple[int, ...] = 1  # blocks per SpatialTransformer: one for all, or one per level
    transformer_depth_middle: int | None = None   # the middle block's (None: the lowest level's)
    adm_in_channels: int = 0        # SDXL: width of the vector y added to the time embedding (label_emb); 0: none
    norm_groups: int = 32

    def depth(self, level: int) -> int:
        """Transformer blocks at resolution level ``level`` (0 = full resolution)."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def middle_depth(self) -> int:
        return self.depth(len(self.channel_mult) - 1) if self.transformer_depth_middle is None \
            else self.transformer_depth_middle

    def heads(self, ch: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer at ``ch`` channels."""
        if self.num_head_channels > 0:
            return ch // self.num_head_channels, self.num_head_channels
        return self.num_heads, ch // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """LDM ``AutoencoderKL`` hyper-parameters (ddconfig names)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latent = scaling_factor * (posterior mean - shift_factor)
    shift_factor: float = 0.0        # SD3: 0.0609
    use_quant_conv: bool = True      # SD3's VAE has no quant_conv / post_quant_conv
    force_upcast: bool = False       # overflows in float16 (SDXL's VAE, encoder included): run it in float32

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer. ``kind`` picks the checkpoint naming: ``openai`` (HF CLIPTextModel names; by default
    QuickGELU, pad with end-of-text) or ``openclip`` (open_clip names, GELU, pad with 0). The conditioning is
    the last layer's output (the penultimate's with ``skip_last_layer``), through the final layer norm if
    ``final_norm``: SD1 last + norm, SD2 penultimate + norm, SDXL's and SD3's towers penultimate, no norm.
    Left unset, ``mlp_width`` (4 x width), ``hidden_act`` and ``pad_id`` take the kind's values on creation."""
    kind: str = "openai"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    heads: int = 12
    layers: int = 12
    mlp_width: int = 0              # the MLP's hidden width, read from the weights (tiny test towers: 37)
    hidden_act: str = ""            # "quick_gelu" or "gelu" (SD3's CLIP-G: HF names with GELU)
    pad_id: int = -1                # SDXL's and SD3's CLIP-G tokenizers pad with "!" (0)
    projection_dim: int = 768       # open_clip text_projection (unused for conditioning, kept to load strictly)
    skip_last_layer: bool = False   # single files hold all layers; SD2 and SDXL read the penultimate one
    final_norm: bool = True         # the final layer norm on the conditioning (SDXL: none)
    pooled: bool = False            # SDXL bigG, SD3: also ln_final(last layer) at end-of-text @ text_projection

    def __post_init__(self):
        openai = self.kind == "openai"
        for name, unset, value in (("mlp_width", 0, 4 * self.width), ("pad_id", -1, 49407 if openai else 0),
                                   ("hidden_act", "", "quick_gelu" if openai else "gelu")):
            if getattr(self, name) == unset:
                object.__setattr__(self, name, value)


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (HF ``T5Config`` names); the defaults are T5-v1.1-XXL's, SD3's third text encoder."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: three networks plus how the UNet output is read. SD3 (``mmdit`` set): the
    MMDiT in place of the UNet (``unet`` unused), CLIP-L in ``text``, CLIP-G in ``text_2``, T5 in ``text_3``."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prediction_type: str = "epsilon"  # or "v_prediction"
    resolution: int = 512             # the image size the model was trained at
    text_2: TextConfig | None = None  # SDXL's second tower (OpenCLIP bigG); its tokens follow the first's
    mmdit: MMDiTConfig | None = None  # SD3 / SD3.5
    text_3: T5Config | None = None    # SD3's T5-XXL, optional: zeros take its place when absent
    t5_tokens: int = 256              # SD3: T5's tokens after CLIP's 77 (diffusers' max_sequence_length)
    flow_shift: float = 0.0           # SD3: s' = k s / (1 + (k - 1) s) with k = flow_shift (scheduler's shift)
    flux: FluxConfig | None = None    # FLUX.1: the transformer; CLIP-L (pooled only) in ``text``, T5 in ``text_3``
    flux_schedule: FluxSchedule | None = None  # FLUX.1: the resolution-dependent shift (scheduler config)

    @property
    def family(self) -> str:
        if self.flux is not None:
            return "flux"
        if self.mmdit is not None:
            return "sd3"
        if self.text_2 is not None:
            return "sdxl"
        return "sd1" if self.text.kind == "openai" else "sd2"

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the UNet's (SD3: the patch size)."""
        if self.mmdit is not None or self.flux is not None:
            return self.vae.downsampling * 2
        return self.vae.downsampling * 2 ** (len(self.unet.channel_mult) - 1)

    def edit_defaults(self) -> dict:
        """The knobs whose default is the model's own, where it differs from ``settings.KNOBS``': FLUX.1's grid steps
        and guidance (``flux_schedule``: dev 28 steps at embedded guidance 3.5, schnell 4 steps without guidance).
        Empty for SD1/2/XL/SD3, whose defaults are the knobs'."""
        s = self.flux_schedule
        return {} if self.flux is None else {"steps": s.steps, "guidance": s.guidance}

    @property
    def size_embed_dim(self) -> int:
        """SDXL: the width of each of the six size/crop embeddings in y (after the pooled text)."""
        return (self.unet.adm_in_channels - self.text_2.projection_dim) // 6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        tup = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}

        def text(t: dict) -> TextConfig:  # metadata written before mlp_width holds mlp_ratio, an integer
            t = dict(t)
            if "mlp_ratio" in t:
                t["mlp_width"] = t.pop("mlp_ratio") * t["width"]
            return TextConfig(**t)
        return cls(unet=UNetConfig(**tup(d["unet"])), vae=VAEConfig(**tup(d["vae"])),
                   text=text(d["text"]), text_2=text(d["text_2"]) if d.get("text_2") else None,
                   prediction_type=d["prediction_type"], resolution=d["resolution"],
                   mmdit=MMDiTConfig(**tup(d["mmdit"])) if d.get("mmdit") else None,
                   text_3=T5Config(**d["text_3"]) if d.get("text_3") else None,
                   t5_tokens=d.get("t5_tokens", 256), flow_shift=d.get("flow_shift", 0.0),
                   flux=FluxConfig(**tup(d["flux"])) if d.get("flux") else None,
                   flux_schedule=FluxSchedule(**d["flux_schedule"]) if d.get("flux_schedule") else None)


_SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
_SD2_TEXT = TextConfig(kind="openclip", width=1024, heads=16, layers=24, projection_dim=1024, skip_last_layer=True)
# SDXL base 1.0: no attention at level 0 (depth 0), CLIP-L's and bigG's penultimate layers concatenated (768 + 1280
# = context 2048); y = [pooled bigG 1280 | six 256-wide size/crop embeddings] = 2816.
_SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=64, context_dim=2048,
                        use_linear_in_transformer=True, transformer_depth=(0, 2, 10), adm_in_channels=2816)
_SDXL_TEXT = TextConfig(skip_last_layer=True, final_norm=False)
_SDXL_TEXT_2 = TextConfig(kind="openclip", width=1280, heads=20, layers=32, projection_dim=1280, skip_last_layer=True,
                          final_norm=False, pooled=True)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(),
    "sd21-base": ModelConfig(unet=_SD2_UNET, text=_SD2_TEXT),
    "sd21": ModelConfig(unet=_SD2_UNET, text=_SD2_TEXT, prediction_type="v_prediction", resolution=768),
    "sdxl": ModelConfig(unet=_SDXL_UNET, vae=VAEConfig(scaling_factor=0.13025, force_upcast=True), text=_SDXL_TEXT,
                        text_2=_SDXL_TEXT_2, resolution=1024),
    # The embedded toy model: 64 px images, 16 x 16 x 4 latents (trained by scripts/train_toy.py; see weights.md).
    "toy": ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                        num_head_channels=8, context_dim=64, use_linear_in_transformer=True, norm_groups=8),
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8, scaling_factor=1.0),
        text=TextConfig(width=64, heads=4, layers=3, projection_dim=64),
        resolution=64),
    # Random-weight models for tests: every code path of sd15 at a fraction of the cost.
    "tiny": ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                        num_heads=2, context_dim=32, norm_groups=8),
        vae=VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        text=TextConfig(width=32, heads=2, layers=2, projection_dim=32),
        resolution=32),
    # Every code path of sdxl: per-level depths with none at level 0, two towers, y (32 + 6 x 8). The middle depth
    # is the last level's, as in SDXL: diffusers' UNet cannot express another.
    "tiny-sdxl": ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_head_channels=8, context_dim=48, use_linear_in_transformer=True, transformer_depth=(0, 2),
                        adm_in_channels=80, norm_groups=8),
        vae=VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.13025, force_upcast=True),
        text=TextConfig(width=16, heads=2, layers=2, projection_dim=16, skip_last_layer=True, final_norm=False),
        text_2=TextConfig(kind="openclip", width=32, heads=2, layers=2, projection_dim=32, skip_last_layer=True,
                          final_norm=False, pooled=True),
        resolution=32),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3 / SD3.5 MMDiT hyper-parameters: each one can be read off a Stability single file's shapes and names."""
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 1536                # x_embedder.proj.weight.shape[0]
    depth: int = 24                        # joint_blocks.N
    patch_size: int = 2                    # x_embedder.proj kernel
    pos_embed_max_size: int = 192          # sqrt(pos_embed.shape[1]): the position table's side, in patches
    context_dim: int = 4096                # context_embedder.weight.shape[1] (T5-XXL width; CLIP states zero-padded)
    pooled_dim: int = 2048                 # y_embedder.mlp.0.weight.shape[1] ([CLIP-L | CLIP-G] pooled)
    qk_norm: bool = False                  # SD3.5: RMS-norm on q and k per head (attn.ln_q / ln_k present)
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 MMDiT-X: blocks with x_block.attn2
    head_dim: int = 64                     # every released model; smaller only in tests
    mlp_width: int | None = None           # mlp.fc1.weight.shape[0]; None: 4 x hidden_size (diffusers' fixed width)

    def __post_init__(self):
        if self.mlp_width is None:
            object.__setattr__(self, "mlp_width", 4 * self.hidden_size)

    @property
    def heads(self) -> int:
        return self.hidden_size // self.head_dim


# From Stability's released single files (sd3_medium, sd3.5_medium, sd3.5_large) and diffusers' model configs.
MMDIT_PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": MMDiTConfig(),
    "sd35-medium": MMDiTConfig(pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13))),
    "sd35-large": MMDiTConfig(hidden_size=2432, depth=38, qk_norm=True),
    # Random-weight model for tests: every code path of sd35-medium (qk-norm, dual attention, the pre-only last block).
    "tiny-sd3": MMDiTConfig(in_channels=16, out_channels=16, hidden_size=64, depth=3, pos_embed_max_size=16,
                            context_dim=40, pooled_dim=24, qk_norm=True, dual_attention_layers=(0,), head_dim=16),
}


# SD3 / SD3.5: CLIP-L and CLIP-G in HF names, both pooled (CLIP-G's tokenizer pads with "!" = 0), T5-XXL, the
# 16-channel VAE without quant convs, the flow schedule's shift 3.0 (the diffusers folders' scheduler configs).
_SD3_CLIP_L = TextConfig(skip_last_layer=True, final_norm=False, pooled=True)
_SD3_CLIP_G = TextConfig(width=1280, heads=20, layers=32, projection_dim=1280, hidden_act="gelu", pad_id=0,
                         skip_last_layer=True, final_norm=False, pooled=True)
_SD3_VAE = VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)


def _sd3(mmdit: MMDiTConfig, **small) -> ModelConfig:
    return ModelConfig(**{**dict(mmdit=mmdit, vae=_SD3_VAE, text=_SD3_CLIP_L, text_2=_SD3_CLIP_G, text_3=T5Config(),
                                 prediction_type="flow_prediction", resolution=1024, flow_shift=3.0), **small})


PRESETS.update({name: _sd3(MMDIT_PRESETS[name]) for name in ("sd3-medium", "sd35-medium", "sd35-large")})
# Every code path of SD3 at a fraction of the cost: MLP widths that are no multiple of the width, as in diffusers'
# own tiny SD3 test pipeline; CLIP-L's projection square (as SD3's, whose single files leave it out), 32 VAE groups.
PRESETS["tiny-sd3"] = _sd3(
    MMDIT_PRESETS["tiny-sd3"], resolution=32,
    vae=dataclasses.replace(_SD3_VAE, ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=TextConfig(width=16, heads=2, layers=2, mlp_width=37, projection_dim=16, skip_last_layer=True,
                    final_norm=False, pooled=True),
    text_2=TextConfig(width=24, heads=2, layers=2, mlp_width=37, projection_dim=8, hidden_act="gelu", pad_id=0,
                      skip_last_layer=True, final_norm=False, pooled=True),
    text_3=T5Config(vocab_size=320, d_model=40, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                    relative_attention_num_buckets=8))


@dataclass(frozen=True)
class FluxConfig:
    """FLUX.1 transformer hyper-parameters (BFL's ``FluxParams``): each one can be read off a single file's shapes."""
    in_channels: int = 64                  # img_in.weight.shape[1]: 16 latent channels x 2 x 2
    hidden_size: int = 3072                # img_in.weight.shape[0]
    mlp_width: int = 12288                 # double_blocks.0.img_mlp.0.weight.shape[0] (mlp_ratio 4)
    num_heads: int = 24                    # hidden_size / head_dim; head_dim = query_norm.scale width = sum(axes_dim)
    depth: int = 19                        # double_blocks.N
    depth_single_blocks: int = 38          # single_blocks.N
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE channels per id axis; they sum to the head width
    theta: float = 10000.0
    context_in_dim: int = 4096             # txt_in.weight.shape[1] (T5-XXL)
    vec_in_dim: int = 768                  # vector_in.in_layer.weight.shape[1] (CLIP-L pooled)
    guidance_embed: bool = True            # guidance_in present: FLUX.1-dev (guidance-distilled); schnell: none
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def heads(self) -> int:
        return self.num_heads


@dataclass(frozen=True)
class FluxSchedule:
    """The resolution-dependent shift (diffusers' FlowMatchEulerDiscreteScheduler config of FLUX.1-dev): mu linear in
    the image's token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift). Schnell
    does not shift (use_dynamic_shifting false, shift 1)."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    dynamic: bool = True
    shift: float = 1.0                     # the static shift when not dynamic
    guidance: float = 3.5                  # the default guidance: embedded (dev, FluxPipeline's); schnell 1 (none)
    steps: int = 28                        # the default grid steps: FluxPipeline's 28 (dev); schnell 4
    t5_tokens: int = 512                   # T5's padded length: 512 dev, 256 schnell (FluxPipeline's max_sequence_length)


FLUX_PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(),
    "flux-schnell": FluxConfig(guidance_embed=False),
    # Random-weight models for tests: every code path (two double, two single blocks, 3-axis RoPE over 32-wide heads
    # split as FLUX.1's 128: an eighth, then half the rest each).
    "tiny-flux": FluxConfig(hidden_size=64, mlp_width=256, num_heads=2, depth=2, depth_single_blocks=2,
                            axes_dim=(4, 14, 14), context_in_dim=40, vec_in_dim=16),
    "tiny-flux-schnell": FluxConfig(hidden_size=64, mlp_width=256, num_heads=2, depth=2, depth_single_blocks=2,
                                    axes_dim=(4, 14, 14), context_in_dim=40, vec_in_dim=16, guidance_embed=False),
}

# FLUX.1: CLIP-L (only its pooled output is used) and T5-XXL, the 16-channel VAE with its own scale and shift.
_FLUX_VAE = VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
_FLUX_CLIP_L = TextConfig()  # all layers and the final norm: the pooler output is read there
_SCHNELL = FluxSchedule(dynamic=False, t5_tokens=256, guidance=1.0, steps=4)  # timestep-distilled: 1-4 steps


def _flux(flux: FluxConfig, schedule: FluxSchedule, **small) -> ModelConfig:
    return ModelConfig(**{**dict(flux=flux, flux_schedule=schedule, vae=_FLUX_VAE, text=_FLUX_CLIP_L,
                                 text_3=T5Config(), prediction_type="flow_prediction", resolution=1024), **small})


PRESETS["flux-dev"] = _flux(FLUX_PRESETS["flux-dev"], FluxSchedule())
PRESETS["flux-schnell"] = _flux(FLUX_PRESETS["flux-schnell"], _SCHNELL)
_TINY_FLUX = dict(resolution=32, vae=dataclasses.replace(_FLUX_VAE, ch=32, ch_mult=(1, 2), num_res_blocks=1),
                  text=TextConfig(width=16, heads=2, layers=2, mlp_width=37, projection_dim=16),
                  text_3=T5Config(vocab_size=320, d_model=40, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                  relative_attention_num_buckets=8))
PRESETS["tiny-flux"] = _flux(FLUX_PRESETS["tiny-flux"], dataclasses.replace(FluxSchedule(), t5_tokens=16),
                             **_TINY_FLUX)
PRESETS["tiny-flux-schnell"] = _flux(FLUX_PRESETS["tiny-flux-schnell"], dataclasses.replace(_SCHNELL, t5_tokens=16),
                                     **_TINY_FLUX)
