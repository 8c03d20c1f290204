"""A tiny Stable-Diffusion-3-format model (SD3Transformer2DModel, rectified flow) trained on diffedit_nb's shapes scenes.

Trained the bundled `shapes-sd3` (diffedit_nb/models/shapes_sd3): 16,000 steps, about two hours on one CPU thread.

Components (diffusers StableDiffusion3Pipeline layout):
  transformer      SD3Transformer2DModel, patch 2 on the 16x16x4 latents (8x8 = 64 image tokens), trained here
  vae              the bundled shapes AutoencoderKL, unchanged except shift_factor = 0.0 (the SD3 pipeline does
                   `latents / scaling_factor + shift_factor`: None there is a TypeError)
  text_encoder(_2) CLIPTextModelWithProjection, frozen: the 2 trained shapes-CLIP layers + an identity 3rd layer,
                   so hidden_states[-2] = the trained output before the final layer norm; text_projection = identity,
                   so text_embeds = final_layer_norm(h)[eos]. Both identical.
  tokenizer(_2)    the bundled CLIP tokenizer (model_max_length 77)
  text_encoder_3 / tokenizer_3  None: the pipeline puts max_sequence_length (default 256) zero tokens in the T5 slot
  scheduler        FlowMatchEulerDiscreteScheduler(shift=1.0)

Training trick for the T5 slot: the 256 zero tokens are identical and the context stream has no position embedding,
so they stay identical through every block; in the joint attention N identical keys/values act exactly like one
key whose logit is raised by log(N). Training uses ONE zero token plus a log(256) attention bias on it
(`RepeatedTokenAttnProcessor`), which is exact for the pipeline's default max_sequence_length=256 at 1/4 the cost.

Usage (diffedit_nb installed; files go to $TRAIN_SD3_DIR, default the current folder):
  python train_sd3.py bench                 # step time of the chosen config
  python train_sd3.py train --minutes 600   # train / resume from ckpt/ (checkpoint every 5 min, save shapes_sd3/ every 20 min)
  python train_sd3.py save [FOLDER]         # write a StableDiffusion3Pipeline folder from the latest checkpoint's EMA
  python train_sd3.py verify [FOLDER] [--compare-sd]  # load offline (load(): from_pretrained with text_encoder_3=None,
                                            # tokenizer_3=None), generate 12 prompts x 2 seeds, colour success
  python train_sd3.py check                 # exactness of the training conditioning vs the pipeline's
"""
from __future__ import annotations
import sys, os, copy, json, math, time, argparse
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from diffusers import (AutoencoderKL, SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from diffedit_nb.shapes import COLORS, SHAPES, object_color, nearest_color
from diffedit_nb.shapes_train import render, to_x, latent_stats, cosine_lr

from diffedit_nb.components import shapes_model_path
BASE = shapes_model_path()  # the UNet shapes model: its VAE, CLIP and tokenizer are reused
HERE = Path(os.environ.get("TRAIN_SD3_DIR", ".")).resolve()  # checkpoints, log and the saved folder go here
CKPT = HERE / "ckpt"
OUT = HERE / "shapes_sd3"
LOG = HERE / "train.log"
T5_LEN = 256  # the pipeline's default max_sequence_length: zeros in the T5 slot
PROMPTS = [f"a {c} {s}" for c in COLORS for s in SHAPES]

TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=24,
                   num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=96, pooled_projection_dim=64,
                   pos_embed_max_size=16)  # 16: images up to 128x128 (and non-square) run; 64x64 uses the central 8x8
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)
RECIPE = dict(n_scenes=30000, steps=16000, bs=32, lr=4e-4, warmup=500, wd=0.01, ema=0.999, p_uncond=0.1,
              p_uniform_t=0.2, clip=1.0, seed=7)


def log(msg):
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(LOG, "a") as f: f.write(line + "\n")


# ----------------------------------------------------------------------------------------------- components
def _tm(m): return getattr(m, "text_model", m)

def make_text_encoder(base_te: CLIPTextModel) -> CLIPTextModelWithProjection:
    "Trained layers + identity layer; penultimate hidden state = trained output before final LN; projection = I."
    d = base_te.config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings",
            "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "layer_norm_eps")
    n = base_te.config.num_hidden_layers
    te = CLIPTextModelWithProjection(CLIPTextConfig(**{k: d[k] for k in keep}, num_hidden_layers=n + 1))
    missing, unexpected = _tm(te).load_state_dict(_tm(base_te).state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"encoder.layers.{n}.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for lin in _tm(te).encoder.layers[n].modules():
            if isinstance(lin, torch.nn.Linear): lin.weight.zero_(); lin.bias.zero_()
        te.text_projection.weight.copy_(torch.eye(d["projection_dim"], d["hidden_size"]))
    return te.eval().requires_grad_(False)

def build(seed=0):
    "All pipeline components (transformer freshly initialised)."
    torch.manual_seed(seed)
    base_te = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder")
    te1, te2 = make_text_encoder(base_te), make_text_encoder(base_te)
    tok = CLIPTokenizer.from_pretrained(BASE / "tokenizer", model_max_length=77)
    tok2 = CLIPTokenizer.from_pretrained(BASE / "tokenizer", model_max_length=77)
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return dict(transformer=transformer, vae=vae, text_encoder=te1, text_encoder_2=te2, text_encoder_3=None,
                tokenizer=tok, tokenizer_2=tok2, tokenizer_3=None, scheduler=sched)

def pipeline(comps) -> StableDiffusion3Pipeline:
    p = StableDiffusion3Pipeline(**comps)
    p.set_progress_bar_config(disable=True)
    return p


# ----------------------------------------------------------------------------------------------- T5-slot trick
class RepeatedTokenAttnProcessor(JointAttnProcessor2_0):
    "JointAttnProcessor2_0 where the LAST context token stands for `n` identical copies (logit bias log n)."
    def __init__(self, n): super().__init__(); self.logn = math.log(n)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        h = attn.heads
        def proj(f, x): return f(x).view(b, -1, h, f.out_features // h).transpose(1, 2)
        q, k, v = proj(attn.to_q, hidden_states), proj(attn.to_k, hidden_states), proj(attn.to_v, hidden_states)
        if attn.norm_q is not None: q = attn.norm_q(q)
        if attn.norm_k is not None: k = attn.norm_k(k)
        cq, ck, cv = (proj(attn.add_q_proj, encoder_hidden_states), proj(attn.add_k_proj, encoder_hidden_states),
                      proj(attn.add_v_proj, encoder_hidden_states))
        if attn.norm_added_q is not None: cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None: ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device); bias[-1] = self.logn
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, :].expand(q.shape[2], -1), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        hs, ehs = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only: ehs = attn.to_add_out(ehs)
        hs = attn.to_out[1](attn.to_out[0](hs))
        return hs, ehs

def use_train_attention(transformer, on=True):
    transformer.set_attn_processor(RepeatedTokenAttnProcessor(T5_LEN) if on else JointAttnProcessor2_0())

@torch.no_grad()
def conditioning(comps, prompts):
    "Pipeline encode_prompt with ONE zero T5 token (stands for T5_LEN zeros with the training attention)."
    pe, _, pp, _ = pipeline(comps).encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                 do_classifier_free_guidance=False, max_sequence_length=1)
    return pe, pp  # (n, 78, 64), (n, 64)


# ----------------------------------------------------------------------------------------------- data
def data(comps, n_scenes):
    "Posterior mean/std latents and caption indices of the training scenes (seeds >= 1,000,000), cached."
    f = CKPT / f"latents_{n_scenes}.pt"
    if f.exists(): return torch.load(f)
    t0 = time.time()
    imgs, caps = render(range(1_000_000, 1_000_000 + n_scenes))
    mean, std, sf_emp = latent_stats(comps["vae"], imgs)
    d = dict(mean=mean, std=std, caps=caps, sf_emp=sf_emp)
    CKPT.mkdir(parents=True, exist_ok=True); torch.save(d, f)
    log(f"encoded {n_scenes} scenes in {time.time()-t0:.0f}s; empirical scaling factor {sf_emp:.4f} "
        f"(vae config {comps['vae'].config.scaling_factor:.4f}); latent mean {mean.mean():.4f}")
    return d


# ----------------------------------------------------------------------------------------------- training
def sample_s(bs, g, p_uniform):
    "Flow time s in (0,1): logit-normal(0,1) (SD3's recipe), mixed with uniform with probability p_uniform."
    s = torch.sigmoid(torch.randn(bs, generator=g))
    u = torch.rand(bs, generator=g)
    return torch.where(torch.rand(bs, generator=g) < p_uniform, u, s)

def _atomic_save(obj, f):
    tmp = f.with_suffix(".tmp"); torch.save(obj, tmp); os.replace(tmp, f)

def train(minutes=60.0, ckpt_every=300, save_every=1200, stop=None, **over):
    torch.set_num_threads(1)
    R = dict(RECIPE, **over)
    comps = build()
    CKPT.mkdir(parents=True, exist_ok=True)
    d = data(comps, R["n_scenes"])
    uniq = sorted(set(d["caps"])) + [""]
    cap_idx = torch.tensor([uniq.index(c) for c in d["caps"]])
    emb, pooled = conditioning(comps, uniq)
    sf = comps["vae"].config.scaling_factor
    model = comps["transformer"]; model.train()
    use_train_attention(model)
    opt = torch.optim.AdamW(model.parameters(), lr=R["lr"], weight_decay=R["wd"])
    ema = copy.deepcopy(model).requires_grad_(False)
    g = torch.Generator().manual_seed(R["seed"])
    step, losses, elapsed = 0, [], 0.0
    ck = CKPT / "last.pt"
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        g.set_state(st["rng"]); step, losses, elapsed = st["step"], st["losses"], st.get("elapsed", 0.0)
        R = st["recipe"]
        log(f"resumed from step {step} ({elapsed/60:.1f} train-minutes so far)")
    else:
        log(f"start: transformer {sum(p.numel() for p in model.parameters())/1e6:.3f}M params, config {TRANSFORMER}, "
            f"recipe {R}, scheduler {SCHEDULER}")

    def checkpoint():
        _atomic_save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), rng=g.get_state(),
                          step=step, losses=losses, elapsed=elapsed, recipe=R, transformer_config=TRANSFORMER), ck)

    t_start = time.time(); last_ck = last_save = time.time(); t_seg = time.time()
    deadline = t_start + minutes * 60
    n = len(d["mean"]); bs = R["bs"]
    while step < R["steps"]:
        for pg in opt.param_groups: pg["lr"] = cosine_lr(step, R["steps"], R["lr"], R["warmup"])
        idx = torch.randint(n, (bs,), generator=g)
        x0 = (d["mean"][idx] + d["std"][idx] * torch.randn(d["mean"][idx].shape, generator=g)) * sf
        ci = cap_idx[idx].clone(); ci[torch.rand(bs, generator=g) < R["p_uncond"]] = len(uniq) - 1
        noise = torch.randn(x0.shape, generator=g)
        s = sample_s(bs, g, R["p_uniform_t"])
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        pred = model(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=emb[ci],
                     pooled_projections=pooled[ci]).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), R["clip"]); opt.step()
        with torch.no_grad():
            dec = min(R["ema"], (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()): pe.lerp_(pm, 1 - dec)
        losses.append(loss.item()); step += 1
        now = time.time(); elapsed += now - t_seg; t_seg = now
        if step % 50 == 0 or step == 1:
            log(f"step {step} loss50 {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed/step:.3f}s/step")
        if now - last_ck > ckpt_every: checkpoint(); last_ck = now; log(f"checkpoint at step {step}")
        if now - last_save > save_every:
            checkpoint(); save(OUT, ema_state=ema.state_dict(), step=step, losses=losses); last_save = last_ck = time.time()
        if (stop and step >= stop) or time.time() > deadline: break
    checkpoint(); log(f"stopped at step {step} (checkpoint written)")
    save(OUT, ema_state=ema.state_dict(), step=step, losses=losses)
    return step


# ----------------------------------------------------------------------------------------------- saving
def save(folder=OUT, ema_state=None, step=None, losses=None):
    "Write a StableDiffusion3Pipeline folder with the EMA transformer (default attention processor)."
    folder = Path(folder)
    if ema_state is None:
        st = torch.load(CKPT / "last.pt", weights_only=False)
        ema_state, step, losses = st["ema"], st["step"], st["losses"]
    comps = build()
    comps["transformer"].load_state_dict(ema_state); comps["transformer"].eval()
    tmp = folder.with_name(folder.name + ".tmp")
    pipeline(comps).save_pretrained(tmp)
    for sub in ("text_encoder", "text_encoder_2"):  # keys with the `text_model.` prefix, as on the hub
        f = tmp / sub / "model.safetensors"
        sd = load_file(f)
        fixed = {k if (k.startswith("text_model.") or k.startswith("text_projection")) else "text_model." + k: v
                 for k, v in sd.items()}
        if fixed != sd: save_file(fixed, f, metadata={"format": "pt"})
    avg = lambda l, k: [float(np.mean(l[i:i + k])) for i in range(0, len(l), k)]
    (tmp / "train_log.json").write_text(json.dumps(dict(step=step, transformer=TRANSFORMER, scheduler=SCHEDULER,
                                                        recipe=RECIPE, t5_len=T5_LEN, loss_per100=avg(losses or [], 100)), indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists(): import shutil; shutil.rmtree(old)
        os.replace(folder, old); os.replace(tmp, folder)
        import shutil; shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    log(f"saved {folder} (EMA at step {step})")
    return folder


# ----------------------------------------------------------------------------------------------- checks
def color_success(images, prompts):
    return float(np.mean([nearest_color(object_color(im)) == p.split()[1] for im, p in zip(images, prompts)]))

@torch.no_grad()
def check(folder=None):
    "Training conditioning (1 zero token + log bias) vs the pipeline's (256 zeros, default attention)."
    torch.set_num_threads(1)
    comps = build()
    if folder: comps["transformer"] = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    m = comps["transformer"].eval()
    with torch.no_grad():  # random weights are too tame: perturb so the check is meaningful
        if not folder:
            for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)
    pipe = pipeline(comps)
    pe, _, pp, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                      do_classifier_free_guidance=False)  # default max_sequence_length=256
    emb, pooled = conditioning(comps, PROMPTS)
    assert pe.shape[1] == 77 + T5_LEN and torch.equal(pe[:, :78], emb) and torch.equal(pp, pooled), (pe.shape, emb.shape)
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0)); t = torch.linspace(50, 950, len(PROMPTS))
    m.set_attn_processor(JointAttnProcessor2_0()); ref = m(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pp).sample
    use_train_attention(m); out = m(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
    m.set_attn_processor(JointAttnProcessor2_0()); one = m(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
    r = dict(pipe_embeds=list(pe.shape), pooled=list(pp.shape), maxabs_train_vs_pipe=(out - ref).abs().max().item(),
             ref_scale=ref.abs().mean().item(), maxabs_1zero_vs_256zeros_without_bias=(one - ref).abs().max().item())
    print(json.dumps(r, indent=1)); return r

def load(folder=OUT, **kw):
    """StableDiffusion3Pipeline.from_pretrained(folder) offline. The T5 slot must be passed as None explicitly:
    diffusers only treats image_encoder/feature_extractor as optional, and a [null, null] entry in model_index.json
    is not enough (ValueError 'expected [...] but only {...} were passed')."""
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, local_files_only=True, **kw)

@torch.no_grad()
def verify(folder=OUT, n_seeds=2, steps=28, guidance=6.0, compare_sd=False):
    torch.set_num_threads(1)
    import warnings
    t0 = time.time()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = load(folder)
    pipe.set_progress_bar_config(disable=True)
    r = dict(folder=str(folder), load_s=round(time.time() - t0, 2), load_warnings=[str(w.message)[:200] for w in seen][:5],
             step=json.loads((Path(folder) / "train_log.json").read_text())["step"], steps=steps, guidance=guidance)
    prompts = [p for p in PROMPTS for _ in range(n_seeds)]
    gens = [torch.Generator().manual_seed(i % n_seeds) for i in range(len(prompts))]
    t0 = time.time()
    ims = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens,
               output_type="np").images
    r["gen_s"] = round(time.time() - t0, 1)
    r["color_success"] = color_success(ims, prompts)
    from diffedit_nb.shapes import SHAPES as _S
    from PIL import Image
    H = ims.shape[1]
    grid = np.concatenate([np.concatenate(list(ims[j::n_seeds]), 1) for j in range(n_seeds)], 0)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(Path(folder).parent / f"{Path(folder).name}_samples.png")
    if compare_sd:
        from diffusers import StableDiffusionPipeline
        sd = StableDiffusionPipeline.from_pretrained(BASE, local_files_only=True, safety_checker=None, requires_safety_checker=False)
        sd.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(i % n_seeds) for i in range(len(prompts))]
        ims2 = sd(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens, output_type="np").images
        r["sd_color_success"] = color_success(ims2, prompts)
    print(json.dumps(r, indent=1)); return r

def bench(n=8):
    torch.set_num_threads(1)
    comps = build(); m = comps["transformer"]; use_train_attention(m)
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    x = torch.randn(32, 4, 16, 16); e = torch.randn(32, 78, 64); p = torch.randn(32, 64); t = torch.rand(32) * 1000
    ts = []
    for _ in range(n):
        t0 = time.time(); out = m(hidden_states=x, timestep=t, encoder_hidden_states=e, pooled_projections=p).sample
        loss = F.mse_loss(out, x); opt.zero_grad(); loss.backward(); opt.step(); ts.append(time.time() - t0)
    print(f"params {sum(q.numel() for q in m.parameters())/1e6:.3f}M  median {np.median(ts[2:]):.3f}s/step  min {min(ts[2:]):.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["train", "save", "verify", "check", "bench"])
    ap.add_argument("folder", nargs="?", default=None)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--compare-sd", action="store_true")
    a = ap.parse_args()
    if a.cmd == "train": train(minutes=a.minutes, stop=a.stop)
    elif a.cmd == "save": save(a.folder or OUT)
    elif a.cmd == "verify": verify(a.folder or OUT, steps=a.steps, guidance=a.guidance, compare_sd=a.compare_sd)
    elif a.cmd == "check": check(a.folder)
    elif a.cmd == "bench": bench()
