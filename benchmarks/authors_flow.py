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
from breakscene.prior import to_pixels
from breakscene.scene import Scene, prepare_scene
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


def step1_parity(ex: Extractor, scene: Scene, cfg: ExtractConfig) -> dict:
    """The same first batch through our processors and through explicit softmax everywhere."""
    n = scene.num_concepts
    prepared = prepare_scene(scene, cfg.resolution or ex.models.native_resolution)
    ex._init_tokens(n, None)
    data = ex._scene_tensors(prepared, cfg)
    batch = ex._draw_batch(random.Random(cfg.seed), torch.Generator(device=ex.device).manual_seed(cfg.seed),
                           data, None, cfg, n)
    m = ex.models
    with torch.no_grad(), autocast_context(ex.device, cfg.mixed_precision):
        ours = training_step(m.unet, m.text_encoder, m.scheduler, ex.store, batch, cfg)
        saved = m.unet.attn_processors
        store = StoreEverything(loss_layers(m.unet, cfg.attn_downsample))
        install_explicit_everywhere(m.unet, store)
        theirs = training_step(m.unet, m.text_encoder, m.scheduler, store, batch, cfg)
        m.unet.set_attn_processor(saved)
    ex._reset()
    return {"ours": float(ours.total), "authors": float(theirs.total),
            "abs_diff": abs(float(ours.total) - float(theirs.total))}


def run_authors_flow(model_folder: str, scene: Scene, cfg: ExtractConfig, device: torch.device) -> dict:
    """One scene, the script's way. Returns seconds per part."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    ex = Extractor(model_folder, device=str(device), max_concepts=cfg.max_concepts, progress=False)
    times["load"] = time.perf_counter() - start
    m = ex.models
    store = StoreEverything(loss_layers(m.unet, cfg.attn_downsample))
    ex.store = store
    install_explicit_everywhere(m.unet, store)
    n = scene.num_concepts
    resolution = cfg.resolution or m.native_resolution
    clock = time.perf_counter()
    prepared = prepare_scene(scene, resolution)
    ex._init_tokens(n, None)
    class_pixels = None
    if cfg.prior.enabled:  # generated again for every scene
        pipe = make_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler.config)
        images = [generate_images(pipe, cfg.prior.class_prompt, [i], cfg.prior.generation_steps, 7.5,
                                  resolution)[0] for i in range(cfg.prior.num_class_images)]
        class_pixels = to_pixels(images).to(device)
    data = ex._scene_tensors(prepared, cfg)  # for masks and prompts; latents are re-encoded below
    times["prepare"] = time.perf_counter() - clock
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    pixels = prepared.pixels[None].to(device)
    class_ids = ex._ids_for_text(cfg.prior.class_prompt)
    scale = m.vae.config.scaling_factor
    T = m.scheduler.config.num_train_timesteps

    def step():
        batch = ex._draw_batch(rng, gen, data, None, cfg, n)
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

    emb = ex._embedding.weight
    emb.requires_grad_(True)
    p1 = run_phase("authors phase 1", cfg.phase1_steps, [{"params": [emb], "lr": cfg.phase1_lr}], [emb], step,
                   ex._restore_other_rows(n), cfg, device, progress=False)
    m.unet.requires_grad_(True)
    m.text_encoder.requires_grad_(True)
    params = list(m.unet.parameters()) + list(m.text_encoder.parameters())
    p2 = run_phase("authors phase 2", cfg.phase2_steps, [{"params": params, "lr": cfg.phase2_lr}], params, step,
                   lambda: None, cfg, device, progress=False)
    times["phase1"], times["phase2"] = p1.seconds, p2.seconds
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the whole pipeline, every scene
        m.save_pretrained(tmp)
    times["save"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - start
    return times
