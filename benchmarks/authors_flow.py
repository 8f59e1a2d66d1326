"""The authors' single-scene script's costs, rebuilt on our models for a fair baseline.

Same math per step as ``training.training_step`` (union sampling, both losses, prior
rows), with the script's costs: models loaded from disk per scene, every attention layer
an explicit-softmax processor that stores its maps, the image (and a class image)
VAE-encoded at every step, class images generated per scene, and the whole pipeline
saved per scene.
"""
from __future__ import annotations

import random
import tempfile
import time

import torch

from breakscene.attention import AttentionStore, CaptureAttnProcessor, loss_layers
from breakscene.config import ExtractConfig
from breakscene.extractor import Extractor
from breakscene.generate import generate_images, make_pipeline
from breakscene.phases import phase_setup
from breakscene.prior import to_pixels
from breakscene.scene import Scene
from breakscene.tensors import draw_batch
from breakscene.training import autocast_context, run_phase, training_step


class StoreEverything(AttentionStore):
    """Keeps every layer's maps, as the script's controller does; the loss still reads only
    the latent/4 layers, so its value equals ours."""

    def __init__(self, loss_layer_names: list[str]) -> None:
        super().__init__()
        self.loss_layer_names = list(loss_layer_names)

    def mean_map(self):
        return torch.stack([self.maps[n] for n in self.loss_layer_names]).mean(0)


class ExplicitAttn(CaptureAttnProcessor):
    """Explicit softmax for self-attention too (the script replaces every layer)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return super().__call__(attn, hidden_states, context, attention_mask, temb)


def install_explicit_everywhere(unet, store: StoreEverything) -> None:
    unet.set_attn_processor({name: ExplicitAttn(store, name) for name in unet.attn_processors})


def _without_prior(cfg: ExtractConfig) -> ExtractConfig:
    return cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"enabled": False})})


def _instance_batch(ex: Extractor, tensors, cfg: ExtractConfig, rng: random.Random, gen: torch.Generator):
    """Our batch drawing without class rows (the script draws those apart, from pixels)."""
    return draw_batch(tensors, None, cfg, rng=rng, gen=gen, encode_subset=ex.assets.encode_subset,
                      num_train_timesteps=ex.models.scheduler.config.num_train_timesteps)


def step1_parity(ex: Extractor, scene: Scene, cfg: ExtractConfig) -> dict:
    """The same first batch through our processors and through explicit softmax everywhere."""
    prepared = ex.prepare(scene, _without_prior(cfg))
    batch = _instance_batch(ex, prepared.tensors, cfg, random.Random(cfg.seed),
                            torch.Generator(device=ex.device).manual_seed(cfg.seed))
    m = ex.models
    with torch.no_grad(), autocast_context(ex.device, cfg.mixed_precision):
        ours = training_step(m.unet, m.text_encoder, m.scheduler, ex.store, batch, cfg)
        saved = m.unet.attn_processors
        store = StoreEverything(loss_layers(m.unet, cfg.attn_downsample))
        install_explicit_everywhere(m.unet, store)
        theirs = training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)
        m.unet.set_attn_processor(saved)
    ex.reset()
    return {"ours": float(ours.total), "authors": float(theirs.total),
            "abs_diff": abs(float(ours.total) - float(theirs.total))}


def run_authors_flow(model_folder: str, scene: Scene, cfg: ExtractConfig, device: torch.device) -> dict:
    """One scene, the script's way. Returns seconds per part."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    ex = Extractor(model_folder, device=str(device), max_concepts=cfg.max_concepts, progress=False)
    times["load"] = time.perf_counter() - start
    m = ex.models
    n = scene.num_concepts
    resolution = cfg.resolution or m.native_resolution
    clock = time.perf_counter()
    # tokens and masks as ours; the latents are encoded again at every step below
    prepared = ex.prepare(scene, _without_prior(cfg))
    store = StoreEverything(loss_layers(m.unet, cfg.attn_downsample))
    install_explicit_everywhere(m.unet, store)
    class_pixels = None
    if cfg.prior.enabled:  # generated again for every scene
        pipe = make_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler.config)
        images = [generate_images(pipe, cfg.prior.class_prompt, [i], cfg.prior.generation_steps, 7.5,
                                  resolution)[0] for i in range(cfg.prior.num_class_images)]
        class_pixels = to_pixels(images).to(device)
    times["prepare"] = time.perf_counter() - clock
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    pixels = prepared.inputs.pixels[None].to(device)
    class_ids = ex.assets.ids_for_text(cfg.prior.class_prompt)
    scale = m.vae.config.scaling_factor
    T = m.scheduler.config.num_train_timesteps

    def step():
        batch = _instance_batch(ex, prepared.tensors, cfg, rng, gen)
        B = batch.latents.shape[0]
        with torch.no_grad():  # the script encodes the image again at every step
            batch.latents = m.vae.encode(pixels.expand(B, -1, -1, -1)).latent_dist.sample(generator=gen) * scale
            if class_pixels is not None:
                idx = torch.randint(0, len(class_pixels), (B,), generator=gen, device=device)
                batch.class_latents = m.vae.encode(class_pixels[idx]).latent_dist.sample(generator=gen) * scale
                batch.class_input_ids = class_ids.expand(B, -1)
                batch.class_noise = torch.randn(batch.class_latents.shape, generator=gen, device=device)
                batch.class_timesteps = torch.randint(0, T, (B,), generator=gen, device=device)
        return training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)

    # the script fine-tunes everything in phase 2: our `full` mode's parameters
    full = cfg.model_copy(update={"phase2_mode": "full"})
    p1 = run_phase("authors phase 1", cfg.phase1_steps,
                   phase_setup("phase1", full, m.unet, m.text_encoder, after_step=ex.assets.keep_only_new_rows(n)),
                   step, cfg=cfg, device=device, progress=False)
    p2 = run_phase("authors phase 2", cfg.phase2_steps, phase_setup("phase2", full, m.unet, m.text_encoder),
                   step, cfg=cfg, device=device, progress=False)
    times["phase1"], times["phase2"] = p1.seconds, p2.seconds
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the whole pipeline, every scene
        m.save_pretrained(tmp)
    times["save"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - start
    return times
