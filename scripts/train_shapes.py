"""Continue training the bundled SD-format shapes model (UNet + CLIP text encoder) on scenes users try.

The bundled `shapes` model (diffedit_nb/models/shapes) was first trained on `scene()`: one mid-sized object on
stripes, blotches or checks. This script fine-tunes its UNet and text encoder (the VAE stays as it is, so the latent
space does not move) on a mix of `rich_scene()` (0-2 objects of 4-50 % of the image, six background kinds, captions
"a red circle and a green square" / "an empty background") and the original `scene()`s, so the model keeps what it
could do and learns what users try first: big objects, two objects, empty scenes (for removal).

Usage (diffedit_nb installed; files go to $TRAIN_SHAPES_DIR, default the current folder):
  python train_shapes.py check             # the VAE's reconstruction error on rich scenes, by background kind
  python train_shapes.py train --minutes M # train / resume from ckpt.pt (checkpoint every 5 min, save shapes/ every 20)
  python train_shapes.py save [FOLDER]     # write the diffusers folder from the latest checkpoint's EMA weights
  --seed N: the batches' and noises' seed (a second phase with the first phase's seed repeats its batches).
  --init FOLDER: start the UNet and text encoder from another shapes-format folder (e.g. an earlier run's `shapes/`,
  for a second phase with its own --lr and --steps); the VAE and tokenizer always come from the bundled model.
  --p-objects 0.1,0.4,0.5 --rich-seed 3000000 --n-rich N --n-orig N: a phase with its own scene mix (shares of 0/1/2-object
  scenes) on its own scenes; --threads N: torch threads (1 unless the cores are free: 2 threads on a busy core crawl).
Training seeds: rich scenes from 2,000,000, original scenes from 1,000,000 (held-out and tuning seeds are < 1,000).
"""
from __future__ import annotations
import os, sys, json, time, copy, shutil, argparse
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
from diffedit_nb.components import shapes_model_path, SD_SCHEDULER_CONFIG
from diffedit_nb.shapes import rich_scene, scene, BACKGROUNDS
from diffedit_nb.shapes_train import to_x, cosine_lr, latent_stats, save_model

BASE = INIT = shapes_model_path()
HERE = Path(os.environ.get("TRAIN_SHAPES_DIR", ".")).resolve()
CKPT, OUT, LOG = HERE / "ckpt.pt", HERE / "shapes", HERE / "train.log"
RECIPE = dict(n_rich=36000, n_orig=12000, steps=9000, bs=32, lr=3e-4, warmup=100, wd=0.01, ema=0.999, p_uncond=0.1,
              clip=1.0, seed=11, threads=1, p_objects=None, rich_seed=2_000_000)
# p_objects: the shares of rich scenes with 0, 1, 2 objects (None: rich_scene's own draw, 15/60/25 %);
# rich_seed: the first rich scene's seed (a phase with its own mix takes its own scenes, e.g. 3,000,000)

def log(msg):
    line = f"{time.strftime('%H:%M:%S')} {msg}"; print(line, flush=True)
    with open(LOG, "a") as f: f.write(line + "\n")

def images(scs):
    return torch.from_numpy(np.stack([np.asarray(s.image) for s in scs])).permute(0, 3, 1, 2).contiguous()

def data():
    "Render the training scenes and encode them once with the bundled VAE (cached in data.pt)."
    f = HERE / "data.pt"; mix = {k: RECIPE[k] for k in ("n_rich", "n_orig", "p_objects", "rich_seed")}
    if f.exists():
        d = torch.load(f)
        if d.get("mix", mix) != mix: sys.exit(f"{f} holds scenes of another mix ({d['mix']}, this run asks {mix}): use another $TRAIN_SHAPES_DIR, or delete it.")
        return d
    t0 = time.time()
    p, r0 = RECIPE["p_objects"], RECIPE["rich_seed"]
    count = lambda s: None if p is None else int(np.random.default_rng([s, 1]).choice(3, p=p))
    scs = [rich_scene(r0 + i, n=count(r0 + i)) for i in range(RECIPE["n_rich"])] + [scene(1_000_000 + i) for i in range(RECIPE["n_orig"])]
    imgs, caps = images(scs), [s.caption for s in scs]
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae").eval()
    mean, std, _ = latent_stats(vae, imgs)
    d = dict(mean=mean, std=std, caps=caps, sf=vae.config.scaling_factor, mix=mix)
    torch.save(d, f); log(f"data: {len(caps)} scenes rendered and encoded in {time.time() - t0:.0f} s")
    return d

@torch.no_grad()
def check():
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae").eval()
    for kind in BACKGROUNDS:
        scs = [rich_scene(900_000 + i, kind=kind) for i in range(64)]
        x = to_x(images(scs))
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        err = (rec - x).abs()
        m = torch.from_numpy(np.stack([s.mask for s in scs]))[:, None].expand_as(err)
        print(f"{kind:9s} L1 all {err.mean():.4f}  object {err[m].mean() if m.any() else float('nan'):.4f}")

def train(minutes):
    torch.set_num_threads(RECIPE["threads"])
    d = data()
    tok = CLIPTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    caps = d["caps"]; uniq = sorted(set(caps)) + [""]
    index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in caps])
    ids = tok(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    unet = UNet2DConditionModel.from_pretrained(INIT, subfolder="unet")
    te = CLIPTextModel.from_pretrained(INIT, subfolder="text_encoder")
    log(f"weights from {INIT}, recipe {RECIPE}")
    unet.train(); te.train()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=RECIPE["wd"])
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    g = torch.Generator().manual_seed(RECIPE["seed"])
    step, losses = 0, []
    if CKPT.exists():
        ck = torch.load(CKPT, weights_only=False)
        unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"]); ema_unet.load_state_dict(ck["ema_unet"])
        ema_te.load_state_dict(ck["ema_te"]); opt.load_state_dict(ck["opt"]); g.set_state(ck["g"])
        step, losses = ck["step"], ck["losses"]; log(f"resumed at step {step}")
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    mean, std, sf, bs, steps = d["mean"], d["std"], d["sf"], RECIPE["bs"], RECIPE["steps"]
    deadline, last_ck, last_save, t0 = time.time() + 60 * minutes, time.time(), time.time(), time.time()

    def checkpoint():
        tmp = CKPT.with_suffix(".tmp")
        torch.save(dict(unet=unet.state_dict(), te=te.state_dict(), ema_unet=ema_unet.state_dict(), ema_te=ema_te.state_dict(),
                        opt=opt.state_dict(), g=g.get_state(), step=step, losses=losses), tmp)
        os.replace(tmp, CKPT)

    while step < steps and time.time() < deadline:
        for pg in opt.param_groups: pg["lr"] = cosine_lr(step, steps, RECIPE["lr"], RECIPE["warmup"])
        idx = torch.randint(len(mean), (bs,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf  # (bs, 4, 16, 16)
        ci = cap_idx[idx].clone(); ci[torch.rand(bs, generator=g) < RECIPE["p_uncond"]] = len(uniq) - 1
        noise = torch.randn(z.shape, generator=g); t = torch.randint(0, 1000, (bs,), generator=g)
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=te(ids[ci])[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, RECIPE["clip"]); opt.step()
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (te, ema_te)):
                for pe, pm in zip(e.parameters(), m.parameters()): pe.lerp_(pm, 1 - RECIPE["ema"])
        losses.append(loss.item()); step += 1
        if step % 100 == 0: log(f"step {step} loss {np.mean(losses[-100:]):.4f} ({(time.time() - t0) / 60:.1f} min this run)")
        if time.time() - last_ck > 300: checkpoint(); last_ck = time.time()
        if time.time() - last_save > 1200: checkpoint(); save(OUT); last_save = time.time()
    checkpoint(); save(OUT); log(f"stopped at step {step}")

def save(folder):
    "Write the diffusers folder from the checkpoint's EMA weights (VAE, tokenizer, scheduler from the bundled model)."
    ck = torch.load(CKPT, weights_only=False)
    unet = UNet2DConditionModel.from_pretrained(BASE, subfolder="unet"); unet.load_state_dict(ck["ema_unet"])
    te = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder"); te.load_state_dict(ck["ema_te"])
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae")
    tok = CLIPTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    folder = Path(folder); tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, vae, te, tok, unet)
    for extra in ("vocabulary.json", "diffedit.json", "confidence.json"):  # the starting model's, else the first model's
        src = INIT / extra if (INIT / extra).exists() else BASE / extra
        if src.exists(): shutil.copy(src, tmp / extra)
    old = json.loads((INIT / "train_log.json").read_text())
    l = ck["losses"]; phase = "finetune" if "finetune" not in old else f"finetune{sum(k.startswith('finetune') for k in old) + 1}"
    (tmp / "train_log.json").write_text(json.dumps(dict(old, **{phase: dict(RECIPE, stop=ck["step"],
        loss_per50=[float(np.mean(l[i:i + 50])) for i in range(0, len(l), 50)])}), indent=1))
    shutil.rmtree(folder, ignore_errors=True); os.replace(tmp, folder)
    log(f"saved {folder} (step {ck['step']})")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("cmd", choices=["check", "train", "save"])
    ap.add_argument("folder", nargs="?"); ap.add_argument("--minutes", type=float, default=600)
    ap.add_argument("--steps", type=int, default=None, help="total steps (the learning-rate schedule's length; default the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default the recipe's)")
    ap.add_argument("--seed", type=int, default=None, help="the batches' and noises' seed (give each phase its own; default the recipe's)")
    ap.add_argument("--init", type=Path, default=None, help="a shapes-format folder to start the UNet and text encoder from")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default the recipe's 1)")
    ap.add_argument("--p-objects", default=None, help="shares of rich scenes with 0,1,2 objects, e.g. 0.1,0.4,0.5")
    ap.add_argument("--rich-seed", type=int, default=None, help="the first rich scene's seed (default 2,000,000)")
    ap.add_argument("--n-rich", type=int, default=None); ap.add_argument("--n-orig", type=int, default=None)
    a = ap.parse_args(); HERE.mkdir(parents=True, exist_ok=True)
    if a.threads: RECIPE["threads"] = a.threads
    if a.p_objects: RECIPE["p_objects"] = [float(x) for x in a.p_objects.split(",")]
    if a.rich_seed is not None: RECIPE["rich_seed"] = a.rich_seed
    if a.n_rich is not None: RECIPE["n_rich"] = a.n_rich
    if a.n_orig is not None: RECIPE["n_orig"] = a.n_orig
    if a.steps: RECIPE["steps"] = a.steps
    if a.lr: RECIPE["lr"] = a.lr
    if a.seed is not None: RECIPE["seed"] = a.seed
    if a.init: INIT = a.init.resolve(); RECIPE["init"] = str(INIT)
    if a.cmd == "check": check()
    elif a.cmd == "train": train(a.minutes)
    else: save(a.folder or OUT)
