"""Train `shapes-inpaint`: the SD-layout shapes UNet made an inpainting UNet, as SD's inpainting checkpoints were made.

SD 1.5 inpainting (its model card): the text-to-image UNet with 5 more input channels (the mask, and the latents of the
masked image), zero-initialised, fine-tuned with random masks. This script does the same to the bundled `shapes-rich`
UNet (it knows 0-2 objects, any size, and "an empty background"), its text encoder, VAE and tokenizer kept frozen (so
the bundled folder shares them instead of shipping copies). The UNet sees, per sample, one of:
  object  the mask of one object of the scene, grown 0-4 px, shrunk 1 px, snapped to the latent grid or boxed (as
          DiffEdit's masks are); the target is the scene, the caption the scene's: paint the named object to fill the mask
  remove  the mask of one object grown 0-4 px; the target is the scene without it (the true background, drawn by the
          scene's own generator), the caption names what is left ("an empty background" when nothing is)
  region  a random blob anywhere; the target is the scene: continue what is around it
  full    the whole image masked, the masked image all zeros: text-to-image mode, so the model also makes its own
          DiffEdit mask (its noise predictions under two prompts) with nothing to look at
Scenes: `rich_scene` (0-2 objects, six background kinds) and `photo_scene` at 64 px (soft-edged textured objects on
greyed photos). The mask reaches the UNet at latent size by max-pooling (a latent pixel touching the mask is masked:
what DiffEdit's painter passes) or, a third of the time, nearest (what diffusers' inpainting pipelines pass).

Usage (diffedit_nb installed; files go to $TRAIN_INPAINT_DIR, default the current folder):
  python train_inpaint.py train --minutes M   # train / resume from ckpt.pt (checkpoint every 5 min, save unet/ every 15)
  python train_inpaint.py save [FOLDER]       # write the UNet folder (EMA weights) from the latest checkpoint
The bundled model: phase 1 as above (16,000-step schedule, stopped at step N, see its train_log.json), then phase 2 in its own folder:
  train --exact --init PHASE1/ckpt.pt --lr 1.5e-4 --steps 8000 --n 16000 --first-seed 5000000 --seed 8 --minutes 62
(phase 1 was stopped at step 4,866 when its grown masks were seen to teach the margin; phase 2 ran for its 62 minutes)
  python train_inpaint.py bundle [UNET]       # write diffedit_nb/models/shapes_inpaint from a saved UNet folder (default ./unet):
                                              # its UNet and configs; VAE, tokenizer and text encoder are shapes-rich's (parts.json)
Training seeds: scenes from 4,000,000 (held-out and tuning seeds are < 1,000).
"""
from __future__ import annotations
import os, sys, json, time, copy, shutil, argparse
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
import cv2
from scipy.ndimage import binary_dilation, binary_erosion
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
from diffedit_nb.components import shapes_model_path, SD_SCHEDULER_CONFIG
from diffedit_nb.shapes import rich_scene, photo_scene, background, caption_of, BACKGROUNDS, EMPTY_CAPTION
from diffedit_nb.shapes_train import cosine_lr, to_x

BASE = shapes_model_path("rich")
HERE = Path(os.environ.get("TRAIN_INPAINT_DIR", ".")).resolve()
CKPT, OUT, LOG = HERE / "ckpt.pt", HERE / "unet", HERE / "train.log"
RECIPE = dict(n=32000, steps=16000, bs=32, lr=2e-4, warmup=200, wd=0.01, ema=0.999, p_uncond=0.1, clip=1.0, seed=7,
              threads=1, first_seed=4_000_000, p_task=dict(object=0.45, remove=0.2, region=0.15, full=0.2), p_photo=0.2,
              exact=False, init=None)
# exact: object masks as DiffEdit gives them after snapping to the image's edges (75 % exact, 10 % grown 1 px, 10 % shrunk
# 1 px, 5 % on the latent grid). The first phase grew them 0-4 px (55 %) or snapped them to the 4-px grid (25 %): the target
# then has background inside the mask's margin, and the model learnt to paint the object a little smaller than the mask,
# leaving a band of background at one edge of DiffEdit's exact masks. init: a checkpoint to start from (its EMA weights).

def log(msg):
    line = f"{time.strftime('%H:%M:%S')} {msg}"; print(line, flush=True)
    with open(LOG, "a") as f: f.write(line + "\n")

def _blob(rng, size):
    "A random ellipse or polygon region of 4-40 % of the image."
    m = np.zeros((size, size), np.uint8); c = rng.uniform(8, size - 8, 2); r = rng.uniform(5, size / 2.5, 2)
    if rng.random() < 0.5: cv2.ellipse(m, (int(c[0]), int(c[1])), (int(r[0]), int(r[1])), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        t = np.sort(rng.uniform(0, 2 * np.pi, 7)); rr = rng.uniform(0.5, 1, 7) * r.mean()
        cv2.fillPoly(m, [np.stack([c[0] + rr * np.cos(t), c[1] + rr * np.sin(t)], 1).astype(np.int32)], 1)
    return m > 0

def _vary(m, rng):
    "An object mask as DiffEdit might give it: grown 0-4 px, shrunk 1 px, snapped to the 4-px latent grid, or boxed (`exact`: mostly exact)."
    u = rng.random()
    if RECIPE["exact"]:
        if u < 0.75: return m
        if u < 0.85: return binary_dilation(m)
        if u < 0.95: e = binary_erosion(m); return e if e.any() else m
        s = m.shape[0]; g = m.reshape(s // 4, 4, s // 4, 4).any((1, 3)); return np.repeat(np.repeat(g, 4, 0), 4, 1)
    if u < 0.55: k = int(rng.integers(0, 5)); return binary_dilation(m, iterations=k) if k else m
    if u < 0.65: e = binary_erosion(m); return e if e.any() else m
    if u < 0.9:  # the latent cells it touches
        s = m.shape[0]; g = m.reshape(s // 4, 4, s // 4, 4).any((1, 3))
        return np.repeat(np.repeat(g, 4, 0), 4, 1)
    ys, xs = np.nonzero(m); b = np.zeros_like(m); b[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    return binary_dilation(b, iterations=int(rng.integers(0, 3))) if rng.random() < 0.5 else b

def sample(i):
    "Training sample i: (target uint8 (64,64,3), mask bool (64,64), caption)."
    seed = RECIPE["first_seed"] + i; rng = np.random.default_rng([seed, 9]); size = 64
    tasks = list(RECIPE["p_task"]); task = tasks[rng.choice(len(tasks), p=list(RECIPE["p_task"].values()))]
    if rng.random() < RECIPE["p_photo"]:
        sc = photo_scene(seed, size)
        if task in ("remove", "region"): task = "object"
        target, things, objs = np.asarray(sc.image), None, [sc.alpha > 0.5]
        cap = sc.caption
    else:
        n = int(rng.choice(3, p=[0.1, 0.6, 0.3])) if task != "remove" else int(rng.choice([1, 2], p=[0.6, 0.4]))
        if task == "object" and n == 0: n = 1
        kind = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=[0.2, 0.2, 0.2, 0.15, 0.15, 0.1])]
        sc = rich_scene(seed, n=n, kind=kind, size=size)
        target, things, objs, cap = np.asarray(sc.image), sc.things, [t.mask for t in sc.things], sc.caption
    if task == "object":
        mask = _vary(objs[rng.integers(len(objs))], rng)
    elif task == "remove":
        j = int(rng.integers(len(things))); gone = things[j].mask
        bg = background(np.random.default_rng(seed), size, sc.kind)
        target = np.where(gone[..., None], bg, target)
        cap = caption_of([t for k, t in enumerate(things) if k != j])
        k = int(rng.integers(0, 5)); mask = binary_dilation(gone, iterations=k) if k else gone
    elif task == "region": mask = _blob(rng, size)
    else: mask = np.ones((size, size), bool)
    return target, mask, cap

def data():
    "Render the samples and encode their targets and masked images once with the frozen VAE (cached in data.pt)."
    f = HERE / "data.pt"
    if f.exists():
        d = torch.load(f)
        if d["n"] != RECIPE["n"] or d["first_seed"] != RECIPE["first_seed"] or d.get("exact", False) != RECIPE["exact"]: sys.exit(f"{f} holds another data set: delete it")
        return d
    t0 = time.time(); vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae").eval()
    tm, ts, mm, ms, masks, caps = [], [], [], [], [], []
    for a in range(0, RECIPE["n"], 256):
        ss = [sample(i) for i in range(a, min(a + 256, RECIPE["n"]))]
        x = to_x(torch.from_numpy(np.stack([s[0] for s in ss])).permute(0, 3, 1, 2))
        m = torch.from_numpy(np.stack([s[1] for s in ss]))[:, None]
        with torch.no_grad():
            d1 = vae.encode(x).latent_dist; d2 = vae.encode(x * (~m)).latent_dist  # diffusers: image * (mask < 0.5)
        tm.append(d1.mean.half()); ts.append(d1.std.half()); mm.append(d2.mean.half()); ms.append(d2.std.half())
        masks.append(m[:, 0]); caps += [s[2] for s in ss]
        if a % 2560 == 0: log(f"data {a}/{RECIPE['n']} ({time.time() - t0:.0f} s)")
    d = dict(n=RECIPE["n"], first_seed=RECIPE["first_seed"], exact=RECIPE["exact"], tm=torch.cat(tm), ts=torch.cat(ts), mm=torch.cat(mm),
             ms=torch.cat(ms), masks=torch.cat(masks), caps=caps, sf=vae.config.scaling_factor)
    torch.save(d, f); log(f"data: {len(caps)} samples rendered and encoded in {time.time() - t0:.0f} s")
    return d

def inpaint_unet(unet:UNet2DConditionModel)->UNet2DConditionModel:
    "The same UNet with 9 input channels: the 5 new ones (mask, masked-image latents) zero-initialised."
    new = UNet2DConditionModel.from_config({**unet.config, "in_channels": 9})
    sd = unet.state_dict(); w = sd["conv_in.weight"]
    sd["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], 1)
    new.load_state_dict(sd); return new

def latent_mask(m, near):
    "Pixel masks (B,1,H,W) -> latent size: max-pool (any pixel masked), or nearest where `near`."
    mx = F.max_pool2d(m, 4); nn_ = F.interpolate(m, scale_factor=0.25, mode="nearest")
    return torch.where(near[:, None, None, None], nn_, mx)

def train(minutes):
    torch.set_num_threads(RECIPE["threads"])
    d = data()
    tok = CLIPTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder").eval()
    caps = d["caps"]; uniq = sorted(set(caps)) + [""]; index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in caps])
    with torch.no_grad():
        emb = te(tok(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)[0]
    unet = inpaint_unet(UNet2DConditionModel.from_pretrained(BASE, subfolder="unet")); unet.train()
    log(f"weights from {BASE}, recipe {RECIPE}, {len(uniq)} captions")
    opt = torch.optim.AdamW(unet.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["wd"])
    ema = copy.deepcopy(unet).requires_grad_(False)
    g = torch.Generator().manual_seed(RECIPE["seed"]); step, losses = 0, []
    if RECIPE["init"] and not CKPT.exists():  # a second phase: the first phase's EMA weights, a fresh optimiser
        w = torch.load(RECIPE["init"], weights_only=False)["ema"]; unet.load_state_dict(w); ema.load_state_dict(w); log(f"weights from {RECIPE['init']}")
    if CKPT.exists():
        ck = torch.load(CKPT, weights_only=False)
        unet.load_state_dict(ck["unet"]); ema.load_state_dict(ck["ema"]); opt.load_state_dict(ck["opt"]); g.set_state(ck["g"])
        step, losses = ck["step"], ck["losses"]; log(f"resumed at step {step}")
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sf, bs, steps = d["sf"], RECIPE["bs"], RECIPE["steps"]
    deadline, last_ck, last_save, t0 = time.time() + 60 * minutes, time.time(), time.time(), time.time()

    def checkpoint():
        tmp = CKPT.with_suffix(".tmp")
        torch.save(dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), g=g.get_state(), step=step,
                        losses=losses), tmp)
        os.replace(tmp, CKPT)

    while step < steps and time.time() < deadline:
        for pg in opt.param_groups: pg["lr"] = cosine_lr(step, steps, RECIPE["lr"], RECIPE["warmup"])
        idx = torch.randint(len(caps), (bs,), generator=g)
        z = (d["tm"][idx].float() + d["ts"][idx].float() * torch.randn(bs, 4, 16, 16, generator=g)) * sf
        zm = (d["mm"][idx].float() + d["ms"][idx].float() * torch.randn(bs, 4, 16, 16, generator=g)) * sf
        m = latent_mask(d["masks"][idx][:, None].float(), torch.rand(bs, generator=g) < 1 / 3)
        ci = cap_idx[idx].clone(); ci[torch.rand(bs, generator=g) < RECIPE["p_uncond"]] = len(uniq) - 1
        noise = torch.randn(z.shape, generator=g); t = torch.randint(0, 1000, (bs,), generator=g)
        x_in = torch.cat([sched.add_noise(z, noise, t), m, zm], 1)  # (bs, 9, 16, 16): latents, mask, masked-image latents
        loss = F.mse_loss(unet(x_in, t, encoder_hidden_states=emb[ci]).sample, noise)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(unet.parameters(), RECIPE["clip"]); opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()): pe.lerp_(pm, 1 - min(RECIPE["ema"], (1 + step) / (10 + step)))
        losses.append(loss.item()); step += 1
        if step % 100 == 0: log(f"step {step} loss {np.mean(losses[-100:]):.4f} ({(time.time() - t0) / 60:.1f} min this run)")
        if time.time() - last_ck > 300: checkpoint(); last_ck = time.time()
        if time.time() - last_save > 900: checkpoint(); save(OUT); last_save = time.time()
    checkpoint(); save(OUT); log(f"stopped at step {step}")

def save(folder):
    "Write the inpainting UNet (the checkpoint's EMA weights) as a diffusers `unet` folder, with its training log beside it."
    ck = torch.load(CKPT, weights_only=False)
    unet = inpaint_unet(UNet2DConditionModel.from_pretrained(BASE, subfolder="unet")); unet.load_state_dict(ck["ema"])
    folder = Path(folder); tmp = folder.with_name(folder.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp)
    l = ck["losses"]
    (tmp / "train_log.json").write_text(json.dumps(dict(RECIPE, init="shapes-rich unet, text encoder/VAE/tokenizer frozen",
        stop=ck["step"], loss_per50=[round(float(np.mean(l[i:i + 50])), 5) for i in range(0, len(l), 50)]), indent=1))
    shutil.rmtree(folder, ignore_errors=True); os.replace(tmp, folder)
    log(f"saved {folder} (step {ck['step']})")

def bundle(unet_folder):
    "The package folder of `shapes-inpaint`: its own UNet, scheduler and files; the rest taken from shapes-rich and the shared files (`parts.json`)."
    import diffedit_nb
    pkg = Path(diffedit_nb.__file__).parent / "models"; dest, rich = pkg / "shapes_inpaint", pkg / "shapes_rich"
    tmp = dest.with_name(dest.name + ".tmp"); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir()
    shutil.copytree(unet_folder, tmp / "unet", ignore=shutil.ignore_patterns("train_log.json"))
    shutil.copytree(rich / "scheduler", tmp / "scheduler")
    idx = json.loads((rich / "model_index.json").read_text()); idx["_class_name"] = "StableDiffusionInpaintPipeline"
    (tmp / "model_index.json").write_text(json.dumps(idx, indent=2) + "\n")
    (tmp / "parts.json").write_text(json.dumps({"tokenizer": "_shared/tokenizer", "vae": "_shared/vae", "text_encoder": "shapes_rich/text_encoder"}, indent=1) + "\n")
    shutil.copy(rich / "vocabulary.json", tmp / "vocabulary.json")
    if (dest / "diffedit.json").exists(): shutil.copy(dest / "diffedit.json", tmp / "diffedit.json")  # the knobs chosen on tuning scenes stay
    else: shutil.copy(rich / "diffedit.json", tmp / "diffedit.json")
    if (Path(unet_folder) / "train_log.json").exists(): shutil.copy(Path(unet_folder) / "train_log.json", tmp / "train_log.json")
    shutil.rmtree(dest, ignore_errors=True); os.replace(tmp, dest); print(f"wrote {dest}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("cmd", choices=["train", "save", "bundle"]); ap.add_argument("folder", nargs="?")
    ap.add_argument("--minutes", type=float, default=600)
    ap.add_argument("--steps", type=int, default=None, help="total steps (the learning-rate schedule's length)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None); ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--first-seed", type=int, default=None); ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--exact", action="store_true", help="object masks as DiffEdit's snapped masks: mostly exact (see RECIPE)")
    ap.add_argument("--init", default=None, help="a checkpoint (ckpt.pt) to start from: its EMA weights")
    a = ap.parse_args(); HERE.mkdir(parents=True, exist_ok=True)
    for k in ("lr", "n", "first_seed", "seed", "init"):
        if getattr(a, k) is not None: RECIPE[k] = getattr(a, k)
    if a.exact: RECIPE["exact"] = True
    if a.steps: RECIPE["steps"] = a.steps
    if a.threads: RECIPE["threads"] = a.threads
    if a.cmd == "train": train(a.minutes)
    elif a.cmd == "bundle": bundle(a.folder or OUT)
    else: save(a.folder or OUT)
