"""Train the embedded toy model from scratch on the toy world (diffedit/toy/world.py).

Phases: (1) the VAE (reconstruction MSE + a small KL), (2) the latent scale from the data (1 / std of the
posterior means) and a cache of scaled latents, (3) the text encoder and UNet together with the epsilon
loss, 10% empty captions so classifier-free guidance works, EMA weights, (4) the VAE decoder alone, on the
posterior means (the encoder, hence the latents the UNet learned, stay fixed; as SD's ft-MSE decoder),
(5) the decoder again, on spliced latents: a toy-world edit's target latents inside a latent-resolution mask
that covers the edit, the source's outside (sometimes amplified inside, as guided sampling amplifies them),
decoded to the target render. DiffEdit decodes exactly such splices; a decoder that never saw one lets the
edited region tint the kept one (its GroupNorm statistics and mid-block attention are image-wide).
Phases 3 to 5 read only phase 2's output (5 starts from 4's decoder), so `--phases unet` may run beside them.
Resumable: the state of each phase is saved every --save-every steps in --out and picked up by the same command.
The export (fp16 single-file safetensors) carries the architecture and this recipe in its metadata.
--world picks the toy world's spec; --init warm-starts from an exported model: its UNet, text encoder (also the EMA's
start) and VAE, and its latent scale, so the latents the UNet learned stay the same (the VAE phase is refused).

    python scripts/train_toy.py --out runs/toy --export diffedit/toy/toy.safetensors
"""
import argparse
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from diffedit import ddim, metrics
from diffedit.models import StableDiffusion, preset, tokenize
from diffedit.toy import world


def flag(default, help: str | None = None, **argparse_kw):
    """A dataclass field that is also a command-line flag (its metadata holds the argparse help)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class Recipe:
    """What decides the trained weights: ``asdict`` of it is recipe.json and the export's ``recipe``."""
    n_scenes: int = flag(30000)
    data_seed: int = flag(world.TRAIN_SEED)
    max_objects: int = flag(2)
    world: str = flag("v1", "toy world spec (diffedit/toy/world.py WORLDS)", choices=tuple(world.WORLDS))
    seed: int = flag(0, "initialisation and batch-order seed")
    vae_steps: int = flag(3000)
    vae_lr: float = flag(1e-3)
    kl_weight: float = flag(1e-6)
    unet_steps: int = flag(10000)
    lr: float = flag(1e-3)
    batch: int = flag(32)
    uncond_prob: float = flag(0.1)
    ema: float = flag(0.999)
    decoder_steps: int = flag(0, "phase 4: decoder fine-tuning steps (0: none)")
    decoder_lr: float = flag(3e-4)
    splice_steps: int = flag(0, "phase 5: decoder steps on spliced edits (0: none)")
    splice_lr: float = flag(2e-4)
    splice_gain: float = flag(2.0,
                              "phase 5: half the splices amplify the edited latents by a factor drawn from [1, this]")
    init: str = flag("", "start from this exported toy model (all its weights and its latent scale; no vae phase)")


@dataclass
class TrainConfig:
    """The command line: where to work and what to run now, around the recipe (its flags stand in its place)."""
    out: Path = flag(Path("runs/toy"), "working folder (state, caches)")
    export: Path | None = flag(None, "write the trained model here (safetensors)", type=Path)
    export_only: bool = flag(False, "export the current state and stop")
    recipe: Recipe = field(default_factory=Recipe)
    save_every: int = flag(200)
    threads: int = flag(0, "torch CPU threads (0: torch's default)")
    device: str = flag("cpu")
    phases: str = flag("vae,unet,decoder,splice", "comma list of phases to train now (vae, unet, decoder, splice); "
                                                  "the latent cache is always made")


def parse_args(argv=None) -> TrainConfig:
    """One flag per field of TrainConfig and Recipe, named after it, in field order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        for g in fields(Recipe) if f.name == "recipe" else [f]:
            kw = {"action": "store_true"} if isinstance(g.default, bool) else {"type": type(g.default)}
            p.add_argument("--" + g.name.replace("_", "-"), default=g.default, **{**kw, **g.metadata})
    given = vars(p.parse_args(argv))
    recipe = Recipe(**{f.name: given.pop(f.name) for f in fields(Recipe)})
    return TrainConfig(**given, recipe=recipe)


# Each phase draws its batches from its own torch stream, seeded seed * SEED_STRIDE + offset + the step it resumes
# at, so phases do not share a batch order and a resumed phase does not replay its first batches. The offsets are
# the ones the shipped model was trained with: changing one changes every number.
SEED_STRIDE = 1000
SEED_OFFSETS = {"vae": 0, "unet": 7, "decoder": 13, "splice": 17}
PHASES = tuple(SEED_OFFSETS)  # in training order
SPLICE_EDIT_STREAM = 5  # phase 5's edits: numpy stream [data_seed, this, step], a list seed unlike any evaluation's int


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def dataset(cfg: TrainConfig):
    cache = cfg.out / "data.npz"
    if cache.exists():
        d = np.load(cache)
        return d["images"], list(d["captions"])
    t0 = time.time()
    r = cfg.recipe
    scenes = world.scenes(r.n_scenes, r.data_seed, max_objects=r.max_objects, spec=world.WORLDS[r.world])
    images, captions = world.render_batch(scenes), [s.caption for s in scenes]
    np.savez(cache, images=images, captions=np.array(captions))
    print(f"generated {len(scenes)} scenes in {time.time() - t0:.1f}s")
    return images, captions


def to_model_range(images_u8: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images_u8).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_batch(images: np.ndarray, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """n training scenes drawn with replacement from ``gen``, in the model's range."""
    return to_model_range(images[torch.randint(0, len(images), (n,), generator=gen).numpy()], device)


def psnr(mse: torch.Tensor) -> str:
    return f"{10 * math.log10(4 / mse.item()):.2f}"  # images span [-1, 1]: peak-to-peak 2, squared 4


def save_state(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good state


def load_saved(path: Path, parts: dict) -> int | None:
    """Load ``parts`` (saved key -> module or optimizer) from a phase's state; the steps it ran (None: not run)."""
    if not path.exists():
        return None
    st = torch.load(path, weights_only=False)
    for key, part in parts.items():
        part.load_state_dict(st[key])
    return st["step"]


def run_phase(cfg: TrainConfig, name: str, modules: dict, params: list, lr: float, steps: int,
              loss_fn: Callable[[int, torch.Generator], tuple[torch.Tensor, dict]], clip: float | None = None,
              after_step: Callable[[int], None] | None = None):
    """The training loop of every phase: AdamW on ``params``, resumed from ``{name}_state.pt`` (``modules`` by
    key, the optimizer as "opt", and "step"), warm-up + cosine lr, saved every --save-every steps and at the end.
    ``loss_fn(step, gen)`` draws a batch from ``gen`` and returns (loss, progress-bar fields)."""
    path = cfg.out / f"{name}_state.pt"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    parts = {**modules, "opt": opt}
    step = load_saved(path, parts) or 0
    gen = torch.Generator().manual_seed(cfg.recipe.seed * SEED_STRIDE + SEED_OFFSETS[name] + step)
    bar = tqdm(range(step, steps), desc=name, initial=step, total=steps)
    for step in bar:
        loss, postfix = loss_fn(step, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if after_step is not None:
            after_step(step)
        bar.set_postfix(postfix)
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            save_state(path, {**{key: part.state_dict() for key, part in parts.items()}, "step": step + 1})


def train_vae(cfg: TrainConfig, sd, images, device):
    """Phase 1: reconstruction MSE of a posterior sample plus a small KL."""
    r, vae = cfg.recipe, sd.first_stage_model

    def loss(step, gen):
        x = image_batch(images, r.batch, gen, device)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)
        mse = F.mse_loss(vae.decode(z), x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        return mse + r.kl_weight * kl, {"psnr": psnr(mse), "kl": f"{kl.item():.0f}"}

    run_phase(cfg, "vae", {"vae": vae}, list(vae.parameters()), r.vae_lr, r.vae_steps, loss)


@torch.no_grad()
def cache_latents(cfg: TrainConfig, sd, images, device, scale: float | None = None):
    """Posterior means of every scene times ``scale`` (default: the scale that gives them unit variance)."""
    path = cfg.out / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae = sd.first_stage_model.eval()
    means = torch.cat([vae.encode(to_model_range(images[i:i + 256], device))[0].cpu()
                       for i in tqdm(range(0, len(images), 256), desc="latents")])
    scale = 1.0 / means.std().item() if scale is None else scale
    out = {"latents": means * scale, "scale": scale}
    torch.save(out, path)
    return out


def train_unet(cfg: TrainConfig, sd, ema, latents, captions, device):
    """Phase 3: text encoder and UNet on the epsilon loss, some captions emptied for guidance; EMA weights."""
    r = cfg.recipe
    ids = tokenize(captions, sd.cfg.text)
    empty = tokenize([""], sd.cfg.text)[0]
    params = [*sd.model.parameters(), *sd.cond_stage_model.parameters()]
    alpha_bar = ddim.alphas_cumprod(dtype=torch.float32).to(device)
    avg = None

    def loss(step, gen):
        nonlocal avg
        idx = torch.randint(0, len(latents), (r.batch,), generator=gen)
        x0 = latents[idx].to(device)
        tok = ids[idx].clone()
        tok[torch.rand(r.batch, generator=gen) < r.uncond_prob] = empty
        t = torch.randint(0, ddim.NUM_TRAIN_TIMESTEPS, (r.batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        ab = alpha_bar[t][:, None, None, None]
        mse = F.mse_loss(sd.unet(ddim.add_noise(x0, noise, ab), t, sd.cond_stage_model(tok.to(device))), noise)
        avg = mse.item() if avg is None else 0.98 * avg + 0.02 * mse.item()
        return mse, {"loss": f"{avg:.4f}"}

    @torch.no_grad()
    def update_ema(step):
        decay = min(r.ema, (1 + step) / (10 + step))  # short memory at first, so early EMA weights are not init
        for e, p in zip(ema.parameters(), params):
            e.lerp_(p, 1 - decay)

    run_phase(cfg, "unet", {"unet": sd.model, "text": sd.cond_stage_model, "ema": ema}, params, r.lr, r.unet_steps,
              loss, clip=1.0, after_step=update_ema)


def decoder_params(vae) -> list:
    """The decoder alone (post_quant_conv and decoder): the encoder, hence the UNet's latents, stays fixed."""
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def finetune_decoder(cfg: TrainConfig, sd, images, device):
    """Phase 4: the decoder alone learns to reconstruct from the posterior mean (the latent DiffEdit decodes)."""
    r, vae = cfg.recipe, sd.first_stage_model

    def loss(step, gen):
        x = image_batch(images, r.batch, gen, device)
        with torch.no_grad():
            mean = vae.encode(x)[0]
        mse = F.mse_loss(vae.decode(mean), x)
        return mse, {"psnr": psnr(mse)}

    run_phase(cfg, "decoder", {"vae": vae}, decoder_params(vae), r.decoder_lr, r.decoder_steps, loss)


def splice_masks(source: np.ndarray, target: np.ndarray, factor: int, dilate: np.ndarray) -> torch.Tensor:
    """(N, 1, h, w) float latent masks: every latent cell that holds a pixel the edit changes, grown by
    ``dilate[i]`` cells (DiffEdit's masks overshoot), so the splice's true image is the target render."""
    changed = np.any(source != target, axis=-1)
    cells = torch.from_numpy(np.stack([metrics.downsample_mask(c, factor, "any") for c in changed])).float()[:, None]
    return torch.stack([F.max_pool2d(c[None], 2 * int(k) + 1, 1, int(k))[0] for c, k in zip(cells, dilate)])


def splice_batch(r: Recipe, vae, rng: np.random.Generator, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh edits from the training distribution as (spliced posterior means, target images)."""
    edits = [world.sample_edit(rng, max_objects=r.max_objects, spec=world.WORLDS[r.world]) for _ in range(n)]
    src = world.render_batch([e.source for e in edits])
    tgt = world.render_batch([e.target for e in edits])
    x_s, x_t = to_model_range(src, device), to_model_range(tgt, device)
    with torch.no_grad():
        z_s, z_t = vae.encode(x_s)[0], vae.encode(x_t)[0]
    m = splice_masks(src, tgt, x_s.shape[-1] // z_s.shape[-1], rng.integers(0, 2, n)).to(device)
    gain = np.where(rng.random(n) < 0.5, 1.0, 1.0 + rng.random(n) * (r.splice_gain - 1.0))
    gain = torch.tensor(gain, dtype=z_t.dtype, device=device)[:, None, None, None]
    return m * gain * z_t + (1 - m) * z_s, x_t


def finetune_splice(cfg: TrainConfig, sd, images, device):
    """Phase 5: the decoder learns to decode spliced edits (half of each batch) and plain posterior means."""
    r, vae = cfg.recipe, sd.first_stage_model
    half = max(1, r.batch // 2)

    def loss(step, gen):
        edits = np.random.default_rng([r.data_seed, SPLICE_EDIT_STREAM, step])
        z, x = splice_batch(r, vae, edits, half, device)
        x_plain = image_batch(images, half, gen, device)
        with torch.no_grad():
            z_plain = vae.encode(x_plain)[0]
        splice_mse = F.mse_loss(vae.decode(z), x)
        mse = F.mse_loss(vae.decode(z_plain), x_plain)
        return splice_mse + mse, {"psnr": psnr(mse), "splice_psnr": psnr(splice_mse)}

    run_phase(cfg, "splice", {"vae": vae}, decoder_params(vae), r.splice_lr, r.splice_steps, loss)


def export(cfg: TrainConfig, sd, ema, scale: float, path: Path):
    """fp16 single-file checkpoint in LDM names; architecture and recipe in the metadata."""
    unet_steps = load_saved(cfg.out / "unet_state.pt", {"ema": ema}) or 0
    model = copy.deepcopy(sd)
    model.model.load_state_dict(ema.model.state_dict())
    model.cond_stage_model.load_state_dict(ema.cond_stage_model.state_dict())
    config = model.cfg.to_dict()
    config["vae"]["scaling_factor"] = scale
    flags = asdict(cfg.recipe)
    recipe = {**flags, "unet_steps_done": unet_steps}
    for phase in ("decoder", "splice"):  # the fine-tuned decoders, in order (the encoder is phase 1's, unchanged)
        if (done := load_saved(cfg.out / f"{phase}_state.pt", {"vae": model.first_stage_model})) is not None:
            recipe[f"{phase}_steps_done"] = done
    if cfg.recipe.init:  # where the weights started: that file's recipe and hash
        with safe_open(cfg.recipe.init, "pt") as f:
            recipe["init_recipe"] = json.loads(f.metadata()["recipe"])
        recipe["init_sha256"] = hashlib.sha256(Path(cfg.recipe.init).read_bytes()).hexdigest()
    history = cfg.out / "history.txt"  # interruptions and manual interventions, recorded by hand
    if history.exists():
        recipe["history"] = history.read_text()
    recipe["command"] = "python scripts/train_toy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if v != "")  # an empty --init is no flag
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"diffedit_config": json.dumps(config), "recipe": json.dumps(recipe)})
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB, {recipe['unet_steps_done']} UNet steps)")


def load_init(sd: StableDiffusion, path: Path) -> float:
    """Load every weight of ``sd`` from an exported toy model (strictly); its latent scale."""
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["diffedit_config"])
        sd.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=True)  # fp16 values, cast on copy
    return float(config["vae"]["scaling_factor"])


class EMA(torch.nn.Module):
    """Exponential moving average of the UNet and text encoder (the shipped weights)."""

    def __init__(self, sd: StableDiffusion):
        super().__init__()
        self.model = copy.deepcopy(sd.model).requires_grad_(False)
        self.cond_stage_model = copy.deepcopy(sd.cond_stage_model).requires_grad_(False)


def main(argv=None):
    cfg = parse_args(argv)
    r = cfg.recipe
    phases = set() if cfg.export_only else set(cfg.phases.split(","))
    if unknown := sorted(phases - set(PHASES)):
        raise SystemExit(f"--phases: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    if r.init and "vae" in phases:
        raise SystemExit("--init keeps the VAE's encoder and latent scale: leave vae out of --phases")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "recipe.json").write_text(json.dumps(asdict(r), indent=1))
    torch.manual_seed(r.seed)
    device = torch.device(cfg.device)
    sd = StableDiffusion(preset("toy")).to(device)
    init_scale = load_init(sd, Path(r.init)) if r.init else None
    ema = EMA(sd)
    images, captions = dataset(cfg)
    if "vae" in phases:
        train_vae(cfg, sd, images, device)
    else:
        load_saved(cfg.out / "vae_state.pt", {"vae": sd.first_stage_model})
    cached = cache_latents(cfg, sd, images, device, init_scale)
    if "unet" in phases:
        train_unet(cfg, sd, ema, cached["latents"], captions, device)
    if "decoder" in phases and r.decoder_steps:
        finetune_decoder(cfg, sd, images, device)
    else:  # phase 5 starts from phase 4's decoder
        load_saved(cfg.out / "decoder_state.pt", {"vae": sd.first_stage_model})
    if "splice" in phases and r.splice_steps:
        finetune_splice(cfg, sd, images, device)
    if cfg.export:
        export(cfg, sd, ema, cached["scale"], cfg.export)


if __name__ == "__main__":
    main()
