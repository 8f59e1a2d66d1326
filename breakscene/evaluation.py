"""Measurements of a trained scene against reference (clean) masks, for the robustness
study. Run through ``Extractor.extract(..., evaluate=Evaluator(...))``, on the trained
weights, before they are reset.

Per concept k:
- attention: ``attention_iou`` of token k's map with clean mask k, ``attention_leak``
  (share of the map's mass outside clean mask k), ``assigned_correct`` (the clean mask
  it overlaps most is k). Maps as in the bundle diagnostic (fixed timesteps and noise).
- reconstruction: squared error of the predicted noise, prompt "a photo of <asset_k>",
  averaged over fixed timesteps and noise, inside clean mask k (``recon_in``) and outside
  every clean mask (``recon_out``), at latent resolution.
- generation: for each prompt template and seed, "a photo of <asset_k> ..." is sampled.
  The generated concept is masked by token k's own cross-attention map during sampling
  (latent/4 layers, conditional row, averaged over the denoising steps, upsampled,
  thresholded at half its maximum); the input concept by clean mask k; both on grey.
  ``identity_sim``: cosine of the identity embedder (DINO ViT-B/16 by default) of the
  two. ``prompt_sim``: CLIP (ViT-L/14 by default) cosine of the whole generated image with
  the template where the token is replaced by the concept's label (or "object").
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from . import masks as M
from .attention import token_maps
from .config import StrictModel
from .embedders import DEFAULT_IDENTITY, DEFAULT_PROMPT
from .metrics import attention_diagnostic
from .training import diffusion_target

# Ten fixed templates in the style of the paper's evaluation (its exact list is not in its text).
TEMPLATES = (
    "a photo of {} at the beach", "a photo of {} in the snow", "a photo of {} in the jungle",
    "a photo of {} on a city street", "a photo of {} in a kitchen", "a photo of {} on a wooden table",
    "a watercolor painting of {}", "a photo of {} on the moon", "a photo of {} in a forest",
    "a photo of {} in the desert",
)


class EvalConfig(StrictModel):
    generation: bool = True
    templates: int = Field(10, ge=1, le=len(TEMPLATES))
    seeds: int = Field(1, ge=1)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    identity_embedder: str = DEFAULT_IDENTITY
    prompt_embedder: str = DEFAULT_PROMPT


def _grey_outside(image: Image.Image, mask: np.ndarray) -> Image.Image:
    arr = np.asarray(image.convert("RGB")).copy()
    m = M.resize_mask(mask, image.size)
    arr[~m] = 128
    return Image.fromarray(arr)


class Evaluator:
    def __init__(self, clean_masks: np.ndarray, labels: list[str], cfg: EvalConfig, identity=None, prompt=None):
        self.clean = clean_masks.astype(bool)
        self.labels = labels
        self.cfg = cfg
        self.identity, self.prompt = identity, prompt

    def __call__(self, ex, data, n: int) -> dict:
        from .scene import prepare_masks

        resolution = data.masks[0].shape[-1]
        clean = prepare_masks(self.clean, resolution).to(ex.device)  # (N, R, R)
        cfg = ex.last_config
        concepts = [{} for _ in range(n)]
        # attention against the clean masks
        maps = ex._attention_maps(data, cfg, n).cpu().numpy()
        ref = (M.downsample(clean, data.attn_size) >= 0.5).cpu().numpy()
        for k, d in enumerate(attention_diagnostic(maps, ref, cfg.diagnostic_threshold)):
            concepts[k].update(attention_iou=d["attention_iou"], attention_leak=1 - d["mass_in_mask"],
                               assigned_correct=d["assigned_mask"] == k)
        # reconstruction inside / outside the clean masks
        for k, (rin, rout) in enumerate(self._reconstruction(ex, data, cfg, clean, n)):
            concepts[k].update(recon_in=rin, recon_out=rout)
        if self.cfg.generation and self.identity is not None and self.prompt is not None:
            for k, scores in enumerate(self._generation(ex, data, clean, n, resolution)):
                concepts[k].update(scores)
        return {"concepts": concepts}

    @torch.no_grad()
    def _reconstruction(self, ex, data, cfg, clean: torch.Tensor, n: int):
        m = ex.models
        latents = data.latent_mean[0]
        gen = torch.Generator(device=ex.device).manual_seed(cfg.diagnostic_seed)
        noise = torch.randn(latents.shape, generator=gen, device=ex.device)
        masks = M.downsample(clean, data.latent_size)  # (N, h, w) coverage
        outside = 1 - masks.amax(0)
        out = []
        for k in range(n):
            ids, _ = ex._encode_prompt((ex.tokens[k],))
            states = m.text_encoder(ids)[0]
            err = torch.zeros(data.latent_size, device=ex.device)
            for t in cfg.diagnostic_timesteps:
                ts = torch.tensor([t], device=ex.device)
                pred = m.unet(m.scheduler.add_noise(latents, noise, ts), ts, states).sample
                err += ((pred.float() - diffusion_target(m.scheduler, latents, noise, ts).float()) ** 2).mean(1)[0]
            err /= len(cfg.diagnostic_timesteps)
            rin = float((err * masks[k]).sum() / masks[k].sum().clamp_min(1e-8))
            rout = float((err * outside).sum() / outside.sum()) if outside.sum() > 0 else float("nan")
            out.append((rin, rout))
        return out

    @torch.no_grad()
    def _generation(self, ex, data, clean: torch.Tensor, n: int, resolution: int):
        pipe = ex.pipeline()
        pixels = ((data.pixels + 1) * 127.5).round().clamp(0, 255)
        source = Image.fromarray(pixels.permute(1, 2, 0).byte().cpu().numpy())
        size = data.attn_size
        results = []
        for k in range(n):
            token, label = ex.tokens[k], (self.labels[k] if k < len(self.labels) and self.labels[k] else "object")
            reference = self.identity.image([_grey_outside(source, clean[k].cpu().numpy() > 0.5)])
            ids_sims, prompt_sims = [], []
            for template in TEMPLATES[: self.cfg.templates]:
                text = template.format(token)
                ids = ex.models.tokenizer(text).input_ids
                position = torch.tensor([ids.index(ex.token_ids[k])], device=ex.device)
                for seed in range(self.cfg.seeds):
                    acc = torch.zeros(1, *size, device=ex.device)

                    def collect(pipeline, step, timestep, kwargs):
                        nonlocal acc
                        acc = acc + token_maps(ex.store.mean_map(), -1, position, size).float()
                        return kwargs

                    ex.store.enabled = True
                    image = pipe(text, num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                                 generator=torch.Generator(device=ex.device).manual_seed(seed), height=resolution,
                                 width=resolution, callback_on_step_end=collect).images[0]
                    amap = acc[0].cpu().numpy()
                    gen_mask = amap >= 0.5 * amap.max() if amap.max() > 0 else np.ones_like(amap, bool)
                    ident = self.identity.image([_grey_outside(image, gen_mask)])
                    ids_sims.append(float(F.cosine_similarity(ident, reference).item()))
                    prompt_text = template.format(label)
                    prompt_sims.append(float((self.prompt.image([image]) * self.prompt.text([prompt_text])).sum()))
            results.append({"identity_sim": float(np.mean(ids_sims)), "prompt_sim": float(np.mean(prompt_sims))})
        return results

