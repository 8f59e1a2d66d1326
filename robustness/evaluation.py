"""Measurements of a trained scene against reference (clean) masks, for the robustness
study. Run through ``Extractor.extract(..., evaluate=Evaluator(...))``: it receives the
``TrainedScene``, whose weights are the trained ones until the Extractor resets.

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

from breakscene.scenes.masks import downsample, resize_mask
from breakscene.method.attention import token_maps
from breakscene.config import StrictModel
from breakscene.method.diagnostics import attention_diagnostic
from breakscene.scenes.scene import rgb_values
from breakscene.method.training import diffusion_target

from robustness.embedders import DEFAULT_IDENTITY, DEFAULT_PROMPT

# Ten fixed templates in the style of the paper's evaluation (its exact list is not in its text).
TEMPLATES = (
    "a photo of {} at the beach", "a photo of {} in the snow", "a photo of {} in the jungle",
    "a photo of {} on a city street", "a photo of {} in a kitchen", "a photo of {} on a wooden table",
    "a watercolor painting of {}", "a photo of {} on the moon", "a photo of {} in a forest",
    "a photo of {} in the desert",
)


class EvalConfig(StrictModel):
    """What is measured of each concept, against the clean masks: attention and reconstruction,
    and with ``generation`` identity and prompt similarity of images generated from templates."""

    generation: bool = Field(True, description="also generate from prompt templates and measure identity and "
                                               "prompt similarity (false: attention and reconstruction only)")
    templates: int = Field(10, ge=1, le=len(TEMPLATES), description="prompt templates used, of the fixed ten")
    seeds: int = Field(1, ge=1, description="images generated per template")
    steps: int = Field(25, ge=1, description="sampler steps of each generated image")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance of each generated image")
    identity_embedder: str = Field(DEFAULT_IDENTITY, description="hub id or folder of the identity embedder "
                                                                 "(DINO or CLIP; tiny: random weights, for tests)")
    prompt_embedder: str = Field(DEFAULT_PROMPT, description="hub id or folder of the CLIP model of prompt "
                                                             "similarity (tiny: random weights, for tests)")


def _grey_outside(image: Image.Image, mask: np.ndarray) -> Image.Image:
    arr = np.asarray(image.convert("RGB")).copy()
    m = resize_mask(mask, image.size)
    arr[~m] = 128
    return Image.fromarray(arr)


class Evaluator:
    def __init__(self, clean_masks: np.ndarray, labels: list[str], cfg: EvalConfig, identity=None, prompt=None):
        self.clean = clean_masks.astype(bool)
        self.labels = labels
        self.cfg = cfg
        self.identity, self.prompt = identity, prompt

    def __call__(self, trained) -> dict:
        from breakscene.scenes.scene import prepare_masks

        data, n, cfg = trained.tensors, trained.num_concepts, trained.config
        resolution = data.masks[0].shape[-1]
        clean = prepare_masks(self.clean, resolution).to(trained.device)  # (N, R, R)
        concepts = [{} for _ in range(n)]
        # attention against the clean masks
        maps = trained.attention_maps().cpu().numpy()
        ref = (downsample(clean, data.attn_size) >= 0.5).cpu().numpy()
        for k, d in enumerate(attention_diagnostic(maps, ref, cfg.diagnostic_threshold)):
            concepts[k].update(attention_iou=d["attention_iou"], attention_leak=1 - d["mass_in_mask"],
                               assigned_correct=d["assigned_mask"] == k)
        # reconstruction inside / outside the clean masks
        for k, (rin, rout) in enumerate(self._reconstruction(trained, clean)):
            concepts[k].update(recon_in=rin, recon_out=rout)
        if self.cfg.generation and self.identity is not None and self.prompt is not None:
            for k, scores in enumerate(self._generation(trained, clean, resolution)):
                concepts[k].update(scores)
        return {"concepts": concepts}

    @torch.no_grad()
    def _reconstruction(self, trained, clean: torch.Tensor):
        m, data, cfg, dev = trained.models, trained.tensors, trained.config, trained.device
        latents = data.latent_mean[0]
        gen = torch.Generator(device=dev).manual_seed(cfg.diagnostic_seed)
        noise = torch.randn(latents.shape, generator=gen, device=dev)
        masks = downsample(clean, data.latent_size)  # (N, h, w) coverage
        outside = 1 - masks.amax(0)
        out = []
        for k in range(trained.num_concepts):
            ids, _ = trained.assets.encode_subset((k,))
            # the backbone's conditioning: SDXL's two encoders, pooled text and size ids
            states, added = trained.resident.backbone.encode_ids(ids, tuple(latents.shape[-2:]))
            err = torch.zeros(data.latent_size, device=dev)
            for t in cfg.diagnostic_timesteps:
                ts = torch.tensor([t], device=dev)
                pred = m.unet(m.scheduler.add_noise(latents, noise, ts), ts, states, added_cond_kwargs=added).sample
                err += ((pred.float() - diffusion_target(m.scheduler, latents, noise, ts).float()) ** 2).mean(1)[0]
            err /= len(cfg.diagnostic_timesteps)
            rin = float((err * masks[k]).sum() / masks[k].sum().clamp_min(1e-8))
            rout = float((err * outside).sum() / outside.sum()) if outside.sum() > 0 else float("nan")
            out.append((rin, rout))
        return out

    @torch.no_grad()
    def _generation(self, trained, clean: torch.Tensor, resolution: int):
        pipe, dev, store = trained.pipeline(), trained.device, trained.resident.store
        pixels = rgb_values(trained.tensors.pixels)
        source = Image.fromarray(pixels.permute(1, 2, 0).byte().cpu().numpy())
        size = trained.tensors.attn_size
        results = []
        for k in range(trained.num_concepts):
            token, label = trained.tokens[k], (self.labels[k] if k < len(self.labels) and self.labels[k] else "object")
            reference = self.identity.image([_grey_outside(source, clean[k].cpu().numpy() > 0.5)])
            ids_sims, prompt_sims = [], []
            for template in TEMPLATES[: self.cfg.templates]:
                text = template.format(token)
                ids = trained.models.tokenizer(text).input_ids
                position = torch.tensor([ids.index(trained.assets.ids[k])], device=dev)
                for seed in range(self.cfg.seeds):
                    acc = torch.zeros(1, *size, device=dev)

                    def collect(pipeline, step, timestep, kwargs):
                        nonlocal acc
                        acc = acc + token_maps(store.mean_map(), -1, position, size).float()
                        return kwargs

                    store.enabled = True
                    image = pipe(text, num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                                 generator=torch.Generator(device=dev).manual_seed(seed), height=resolution,
                                 width=resolution, callback_on_step_end=collect).images[0]
                    amap = acc[0].cpu().numpy()
                    gen_mask = amap >= 0.5 * amap.max() if amap.max() > 0 else np.ones_like(amap, bool)
                    ident = self.identity.image([_grey_outside(image, gen_mask)])
                    ids_sims.append(float(F.cosine_similarity(ident, reference).item()))
                    prompt_text = template.format(label)
                    prompt_sims.append(float((self.prompt.image([image]) * self.prompt.text([prompt_text])).sum()))
            results.append({"identity_sim": float(np.mean(ids_sims)), "prompt_sim": float(np.mean(prompt_sims))})
        return results

