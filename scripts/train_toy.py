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

    python scripts/train_toy.py --out runs/toy --export diffedit/toy/toy.safetensors
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from diffedit import ddim, metrics
from diffedit.models import StableDiffusion, preset, tokenize
from diffedit.toy import world


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/toy"), help="working folder (state, caches)")
    p.add_argument("--export", type=Path, default=None, help="write the trained model here (safetensors)")
    p.add_argument("--export-only", action="store_true", help="export the current state and stop")
    p.add_argument("--n-scenes", type=int, default=30000)
    p.add_argument("--data-seed", type=int, default=world.TRAIN_SEED)
    p.add_argument("--max-objects", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--unet-steps", type=int, default=10000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decoder-steps", type=int, default=0, help="phase 4: decoder fine-tuning steps (0: none)")
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--splice-steps", type=int, default=0, help="phase 5: decoder steps on spliced edits (0: none)")
    p.add_argument("--splice-lr", type=float, default=2e-4)
    p.add_argument("--splice-gain", type=float, default=2.0,
                   help="phase 5: half the splices amplify the edited latents by a factor drawn from [1, this]")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--phases", default="vae,unet,decoder,splice",
                   help="comma list of phases to train now (vae, unet, decoder, splice); the latent cache is always made")
    return p.parse_args(argv)


PHASES = ("vae", "unet", "decoder", "splice")
RECIPE_KEYS = ("n_scenes", "data_seed", "max_objects", "seed", "vae_steps", "vae_lr", "kl_weight", "unet_steps",
               "lr", "batch", "uncond_prob", "ema", "decoder_steps", "decoder_lr", "splice_steps", "splice_lr",
               "splice_gain")


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def dataset(args):
    cache = args.out / "data.npz"
    if cache.exists():
        d = np.load(cache)
        return d["images"], list(d["captions"])
    t0 = time.time()
    scenes = world.scenes(args.n_scenes, args.data_seed, max_objects=args.max_objects)
    images, captions = world.render_batch(scenes), [s.caption for s in scenes]
    np.savez(cache, images=images, captions=np.array(captions))
    print(f"generated {len(scenes)} scenes in {time.time() - t0:.1f}s")
    return images, captions


def to_model_range(images_u8: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images_u8).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_state(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good state


def train_vae(args, sd, images, device):
    path = args.out / "vae_state.pt"
    vae = sd.first_stage_model
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if path.exists():
        st = torch.load(path, weights_only=False)
        vae.load_state_dict(st["vae"]), opt.load_state_dict(st["opt"])
        step = st["step"]
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    bar = tqdm(range(step, args.vae_steps), desc="vae", initial=step, total=args.vae_steps)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=gen).numpy()
        x = to_model_range(images[idx], device)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)
        recon = vae.decode(z)
        mse = F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = mse + args.kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(psnr=f"{10 * math.log10(4 / mse.item()):.2f}", kl=f"{kl.item():.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.vae_steps:
            save_state(path, {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    if path.exists():
        vae.load_state_dict(torch.load(path, weights_only=False)["vae"])


@torch.no_grad()
def cache_latents(args, sd, images, device):
    """Posterior means of every scene and the scale that gives them unit variance."""
    path = args.out / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae = sd.first_stage_model.eval()
    means = torch.cat([vae.encode(to_model_range(images[i:i + 256], device))[0].cpu()
                       for i in tqdm(range(0, len(images), 256), desc="latents")])
    scale = 1.0 / means.std().item()
    out = {"latents": means * scale, "scale": scale}
    torch.save(out, path)
    return out


def train_unet(args, sd, ema, latents, captions, device):
    path = args.out / "unet_state.pt"
    text_cfg = sd.cfg.text
    ids = tokenize(captions, text_cfg)
    empty = tokenize([""], text_cfg)[0]
    params = list(sd.model.parameters()) + list(sd.cond_stage_model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step = 0
    if path.exists():
        st = torch.load(path, weights_only=False)
        sd.model.load_state_dict(st["unet"]), sd.cond_stage_model.load_state_dict(st["text"])
        ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        step = st["step"]
    alpha_bar = ddim.alphas_cumprod(dtype=torch.float32).to(device)
    gen = torch.Generator().manual_seed(args.seed * 1000 + 7 + step)
    bar = tqdm(range(step, args.unet_steps), desc="unet", initial=step, total=args.unet_steps)
    avg = None
    for step in bar:
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        x0 = latents[idx].to(device)
        tok = ids[idx].clone()
        tok[torch.rand(args.batch, generator=gen) < args.uncond_prob] = empty
        t = torch.randint(0, ddim.NUM_TRAIN_TIMESTEPS, (args.batch,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        ab = alpha_bar[t][:, None, None, None]
        pred = sd.unet(ddim.add_noise(x0, noise, ab), t, sd.cond_stage_model(tok.to(device)))
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), [*sd.model.parameters(), *sd.cond_stage_model.parameters()]):
                e.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            save_state(path, {"unet": sd.model.state_dict(), "text": sd.cond_stage_model.state_dict(),
                              "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1})


def decoder_optimizer(vae, path: Path, lr: float) -> tuple[torch.optim.Optimizer, int]:
    """AdamW over the decoder alone (post_quant_conv and decoder), resumed from ``path`` when it exists."""
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if not path.exists():
        return opt, 0
    st = torch.load(path, weights_only=False)
    vae.load_state_dict(st["vae"]), opt.load_state_dict(st["opt"])
    return opt, st["step"]


def finetune_decoder(args, sd, images, device):
    """Phase 4: the decoder alone learns to reconstruct from the posterior mean (the latent DiffEdit decodes)."""
    path = args.out / "decoder_state.pt"
    vae = sd.first_stage_model
    opt, step = decoder_optimizer(vae, path, args.decoder_lr)
    gen = torch.Generator().manual_seed(args.seed * 1000 + 13 + step)
    bar = tqdm(range(step, args.decoder_steps), desc="decoder", initial=step, total=args.decoder_steps)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=gen).numpy()
        x = to_model_range(images[idx], device)
        with torch.no_grad():
            mean, _ = vae.encode(x)
        mse = F.mse_loss(vae.decode(mean), x)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.decoder_steps, args.decoder_lr)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()
        bar.set_postfix(psnr=f"{10 * math.log10(4 / mse.item()):.2f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.decoder_steps:
            save_state(path, {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})


def splice_masks(source: np.ndarray, target: np.ndarray, factor: int, dilate: np.ndarray) -> torch.Tensor:
    """(N, 1, h, w) float latent masks: every latent cell that holds a pixel the edit changes, grown by
    ``dilate[i]`` cells (DiffEdit's masks overshoot), so the splice's true image is the target render."""
    changed = np.any(source != target, axis=-1)
    cells = torch.from_numpy(np.stack([metrics.downsample_mask(c, factor, "any") for c in changed])).float()[:, None]
    return torch.stack([F.max_pool2d(c[None], 2 * int(k) + 1, 1, int(k))[0] for c, k in zip(cells, dilate)])


def splice_batch(args, vae, rng: np.random.Generator, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh edits from the training distribution as (spliced posterior means, target images)."""
    edits = [world.sample_edit(rng, max_objects=args.max_objects) for _ in range(n)]
    src = world.render_batch([e.source for e in edits])
    tgt = world.render_batch([e.target for e in edits])
    x_s, x_t = to_model_range(src, device), to_model_range(tgt, device)
    with torch.no_grad():
        z_s, z_t = vae.encode(x_s)[0], vae.encode(x_t)[0]
    m = splice_masks(src, tgt, x_s.shape[-1] // z_s.shape[-1], rng.integers(0, 2, n)).to(device)
    gain = np.where(rng.random(n) < 0.5, 1.0, 1.0 + rng.random(n) * (args.splice_gain - 1.0))
    gain = torch.tensor(gain, dtype=z_t.dtype, device=device)[:, None, None, None]
    return m * gain * z_t + (1 - m) * z_s, x_t


def finetune_splice(args, sd, images, device):
    """Phase 5: the decoder learns to decode spliced edits (half of each batch) and plain posterior means."""
    path = args.out / "splice_state.pt"
    vae = sd.first_stage_model
    opt, step = decoder_optimizer(vae, path, args.splice_lr)
    gen = torch.Generator().manual_seed(args.seed * 1000 + 17 + step)
    half = max(1, args.batch // 2)
    bar = tqdm(range(step, args.splice_steps), desc="splice", initial=step, total=args.splice_steps)
    for step in bar:
        # edits from their own stream of the data seed (a list seed: never equal to an evaluation's int seed)
        z, x = splice_batch(args, vae, np.random.default_rng([args.data_seed, 5, step]), half, device)
        idx = torch.randint(0, len(images), (half,), generator=gen).numpy()
        x_plain = to_model_range(images[idx], device)
        with torch.no_grad():
            z_plain = vae.encode(x_plain)[0]
        splice_mse = F.mse_loss(vae.decode(z), x)
        mse = F.mse_loss(vae.decode(z_plain), x_plain)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.splice_steps, args.splice_lr)
        opt.zero_grad(set_to_none=True)
        (splice_mse + mse).backward()
        opt.step()
        bar.set_postfix(psnr=f"{10 * math.log10(4 / mse.item()):.2f}",
                        splice_psnr=f"{10 * math.log10(4 / splice_mse.item()):.2f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.splice_steps:
            save_state(path, {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})


def export(args, sd, ema, scale: float, path: Path):
    """fp16 single-file checkpoint in LDM names; architecture and recipe in the metadata."""
    state = torch.load(args.out / "unet_state.pt", weights_only=False) if (args.out / "unet_state.pt").exists() else None
    if state is not None:
        ema.load_state_dict(state["ema"])
    model = copy.deepcopy(sd)
    model.model.load_state_dict(ema.model.state_dict())
    model.cond_stage_model.load_state_dict(ema.cond_stage_model.state_dict())
    cfg = model.cfg.to_dict()
    cfg["vae"]["scaling_factor"] = scale
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    recipe["unet_steps_done"] = state["step"] if state else 0
    for phase in ("decoder", "splice"):  # the fine-tuned decoders, in order (the encoder is phase 1's, unchanged)
        if (args.out / f"{phase}_state.pt").exists():
            dec = torch.load(args.out / f"{phase}_state.pt", weights_only=False)
            model.first_stage_model.load_state_dict(dec["vae"])
            recipe[f"{phase}_steps_done"] = dec["step"]
    history = args.out / "history.txt"  # interruptions and manual interventions, recorded by hand
    if history.exists():
        recipe["history"] = history.read_text()
    recipe["command"] = "python scripts/train_toy.py " + " ".join(
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in RECIPE_KEYS)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"diffedit_config": json.dumps(cfg), "recipe": json.dumps(recipe)})
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB, {recipe['unet_steps_done']} UNet steps)")


class EMA(torch.nn.Module):
    """Exponential moving average of the UNet and text encoder (the shipped weights)."""

    def __init__(self, sd: StableDiffusion):
        super().__init__()
        self.model = copy.deepcopy(sd.model).requires_grad_(False)
        self.cond_stage_model = copy.deepcopy(sd.cond_stage_model).requires_grad_(False)


def main(argv=None):
    args = parse_args(argv)
    phases = set() if args.export_only else set(args.phases.split(","))
    if unknown := sorted(phases - set(PHASES)):
        raise SystemExit(f"--phases: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.json").write_text(json.dumps({k: getattr(args, k) for k in RECIPE_KEYS}, indent=1))
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sd = StableDiffusion(preset("toy")).to(device)
    ema = EMA(sd)
    images, captions = dataset(args)
    if "vae" in phases:
        train_vae(args, sd, images, device)
    elif (args.out / "vae_state.pt").exists():
        sd.first_stage_model.load_state_dict(torch.load(args.out / "vae_state.pt", weights_only=False)["vae"])
    cached = cache_latents(args, sd, images, device)
    if "unet" in phases:
        train_unet(args, sd, ema, cached["latents"], captions, device)
    if "decoder" in phases and args.decoder_steps:
        finetune_decoder(args, sd, images, device)
    elif (args.out / "decoder_state.pt").exists():  # phase 5 starts from phase 4's decoder
        sd.first_stage_model.load_state_dict(torch.load(args.out / "decoder_state.pt", weights_only=False)["vae"])
    if "splice" in phases and args.splice_steps:
        finetune_splice(args, sd, images, device)
    if args.export:
        export(args, sd, ema, cached["scale"], args.export)


if __name__ == "__main__":
    main()
