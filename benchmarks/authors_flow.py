"""The authors' single-scene script's costs, rebuilt on our models for a fair baseline.

Same math per step as ``training.training_step`` (union sampling, both losses, prior
rows), with the costs of the script (google/break-a-scene ``train.py`` and ``ptp_utils.py``):

- per scene: models loaded from disk, class images generated (four per pipeline call)
  and saved as JPEG files, the whole pipeline saved at the end;
- per step, its data set: the instance and class prompts tokenised, a class image read
  from disk and decoded, the chosen masks flipped and resized;
- per step, its loop: the image and the class image VAE-encoded, explicit softmax in
  every attention layer with the prompt-to-prompt controller copying each layer's
  probabilities (and keeping those of layers with at most 32x32 queries, all heads),
  each token's position and the losses read on the host, torch's default AdamW, a
  constant learning-rate scheduler stepped, gradients zeroed rather than freed, the
  progress bar's postfix set.

What it does not rebuild (each would only make it slower): accelerate's wrappers, the
data loader's worker machinery, logging to TensorBoard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from breakscene.method.attention import AttentionStore, CaptureAttnProcessor, loss_layers
from breakscene.config import ExtractConfig
from breakscene.extraction.extractor import Extractor, PreparedExtraction
from breakscene.extraction.generate import fused_attention, generate_images, make_pipeline
from breakscene.method.phases import PhaseSetup, phase_setup
from breakscene.method.prior import to_pixels
from breakscene.method.union_sampling import concept_prompt, sample_subset
from breakscene.scenes.scene import Scene
from breakscene.extraction.tensors import draw_batch, subset_masks
from breakscene.method.training import Batch, PhaseResult, autocast_context, make_optimizer, training_step

CONTROLLER_MAX_QUERIES = 32**2  # ptp_utils.AttentionStore keeps the maps of layers with at most this many queries
SAMPLE_BATCH = 4  # the script's --sample_batch_size: class images per pipeline call


class ControllerStore(AttentionStore):
    """The script's controller: maps kept with all heads; the loss averages the loss layers'
    maps over layers and heads (``aggregate_attention``), the value ours takes."""

    def __init__(self, loss_layer_names: list[str]) -> None:
        super().__init__()
        self.loss_layer_names = list(loss_layer_names)

    def mean_map(self) -> torch.Tensor:
        average = {name: maps / 1 for name, maps in self.maps.items()}  # get_average_attention, cur_step 1
        return torch.cat([average[n] for n in self.loss_layer_names], dim=1).mean(1)


class ExplicitAttn(CaptureAttnProcessor):
    """Explicit softmax in every layer, self-attention too, as the script's processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return super().__call__(attn, hidden_states, context, attention_mask, temb)

    def keep(self, probs: torch.Tensor) -> None:
        # AttentionControl.__call__: every layer's probabilities copied, the kept half written back
        copy = probs.clone()
        half = probs.shape[0] // 2
        copy[half:] = probs[half:]
        if probs.shape[2] <= CONTROLLER_MAX_QUERIES:
            self.store.maps[self.name] = probs


def _without_prior(cfg: ExtractConfig) -> ExtractConfig:
    return cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"enabled": False})})


class AuthorsFlow:
    """The script's training of one prepared scene on ``ex``'s models; its class images are
    the files ``class_files`` (read one per step, as its data set does)."""

    def __init__(self, ex: Extractor, prepared: PreparedExtraction, class_files: list[Path],
                 cfg: ExtractConfig) -> None:
        self.ex, self.models, self.cfg = ex, ex.models, cfg
        # its own cache of resized masks: it empties it at every step, as the script resizes them
        self.data = dataclasses.replace(prepared.tensors, subset_cache={})
        self.pixels = prepared.inputs.pixels.to(ex.device)  # the data set keeps the image as a tensor
        self.class_files = class_files
        self.store = ControllerStore(loss_layers(self.models.unet, cfg.attn_downsample))
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator(device=ex.device).manual_seed(cfg.seed)

    @contextlib.contextmanager
    def installed(self):
        """The script's processor in every layer and NCHW weights; ours back after."""
        unet = self.models.unet
        saved = unet.attn_processors
        unet.set_attn_processor({name: ExplicitAttn(self.store, name) for name in unet.attn_processors})
        unet.to(memory_format=torch.contiguous_format)
        try:
            yield self
        finally:
            unet.set_attn_processor(saved)
            if self.ex.runtime.channels_last:
                unet.to(memory_format=torch.channels_last)

    def tokenize(self, text: str) -> torch.Tensor:
        tok = self.models.tokenizer
        return tok(text, truncation=True, padding="max_length", max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(self.ex.device)

    def example(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DreamBoothDataset.__getitem__: (prompt ids, token positions, attention-size masks,
        union mask, image pixels) of a random subset, flipped at random."""
        data = self.data
        subset = tuple(sample_subset(self.rng, data.num_concepts))
        flip = int(self.rng.random() < self.cfg.flip_p)
        ids = self.tokenize(concept_prompt([self.ex.tokens[i] for i in subset]))
        token_ids = [self.ex.assets.ids[i] for i in subset]
        positions = torch.tensor([int((ids[0] == t).nonzero().item()) for t in token_ids], device=ids.device)
        data.subset_cache.clear()  # the script resizes the chosen masks at every step
        attn, union = subset_masks(data, flip, subset)
        return ids, positions, attn, union, self.pixels.flip(-1) if flip else self.pixels

    def class_image(self) -> torch.Tensor:
        path = self.class_files[self.rng.randrange(len(self.class_files))]  # the loader's shuffled index
        return to_pixels([Image.open(path).convert("RGB")])[0].to(self.ex.device)

    def batch(self) -> Batch:
        """collate_fn (class rows first), then the loop's VAE encoding, noise and timesteps."""
        cfg, m, dev, B = self.cfg, self.models, self.ex.device, self.cfg.batch_size
        ids, positions, attn, unions, images = zip(*(self.example() for _ in range(B)))
        prior = cfg.prior.enabled
        if prior:
            images = [self.class_image() for _ in range(B)] + list(images)
            class_ids = torch.cat([self.tokenize(cfg.prior.class_prompt) for _ in range(B)])
        with torch.no_grad():
            dist = m.vae.encode(torch.stack(images)).latent_dist
            latents = dist.sample(generator=self.gen) * m.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=self.gen, device=dev)
        timesteps = torch.randint(0, m.scheduler.config.num_train_timesteps, (len(latents),), generator=self.gen,
                                  device=dev)
        first = B if prior else 0  # the instance rows
        batch = Batch(latents=latents[first:], input_ids=torch.cat(ids), token_positions=list(positions),
                      attn_masks=list(attn), union_mask=torch.stack(unions), noise=noise[first:],
                      timesteps=timesteps[first:])
        if prior:
            batch.class_latents, batch.class_input_ids = latents[:B], class_ids
            batch.class_noise, batch.class_timesteps = noise[:B], timesteps[:B]
        return batch

    def step(self):
        return training_step(self.models.unet, self.models.text_encoder, self.models.scheduler, self.store,
                             self.batch(), self.cfg)

    def run_phase(self, name: str, steps: int, setup: PhaseSetup) -> PhaseResult:
        """The script's loop for ``steps`` steps over ``setup``'s parameters."""
        cfg, dev, m = self.cfg, self.ex.device, self.models
        opt = make_optimizer(setup, cfg, dev, "torch")
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # get_scheduler("constant")
        scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and cfg.mixed_precision == "fp16")
        history = []
        with open(os.devnull, "w") as sink:  # the script's bar is on; its text goes nowhere here
            bar = tqdm(total=steps, desc=name, file=sink)
            start = time.perf_counter()
            for _ in range(steps):
                with autocast_context(dev, cfg.mixed_precision):
                    terms = self.step()
                logs = {"attn_loss": float(cfg.lambda_attn * terms.attention.detach())}
                scaler.scale(terms.total).backward()
                self.store.clear()  # "No need to keep the attention store"
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(itertools.chain(m.unet.parameters(), m.text_encoder.parameters()),
                                               cfg.optimizer.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                schedule.step()
                opt.zero_grad(set_to_none=False)  # --set_grads_to_none is off by default
                setup.after_step()
                logs.update(loss=float(terms.total.detach()), lr=schedule.get_last_lr()[0])
                bar.set_postfix(**logs)
                bar.update()
                history.append(terms.detached())
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - start
            bar.close()
        losses = torch.stack(history) if history else torch.zeros(0, 4)
        return PhaseResult(name=name, steps=steps, seconds=seconds, losses=losses)

    def setup(self, phase: str) -> PhaseSetup:
        """The script trains what our ``full`` mode trains, with the same row hygiene in phase 1."""
        full = self.cfg.model_copy(update={"phase2_mode": "full"})
        keep = self.ex.assets.keep_only_new_rows(self.data.num_concepts) if phase == "phase1" else None
        return phase_setup(phase, full, self.models.unet, self.models.text_encoder, after_step=keep)


def generate_class_files(ex: Extractor, cfg: ExtractConfig, resolution: int, folder: Path) -> list[Path]:
    """The script's class images: generated in calls of SAMPLE_BATCH and saved as JPEG."""
    m = ex.models
    pipe = make_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler.config)
    files = []
    with fused_attention(m.unet):  # the script samples with a separate, plain pipeline
        for first in range(0, cfg.prior.num_class_images, SAMPLE_BATCH):
            seeds = list(range(first, min(first + SAMPLE_BATCH, cfg.prior.num_class_images)))
            for seed, image in zip(seeds, generate_images(pipe, cfg.prior.class_prompt, seeds,
                                                          cfg.prior.generation_steps, 7.5, resolution)):
                files.append(folder / f"{seed}.jpg")
                image.save(files[-1])
    return files


def step1_parity(ex: Extractor, scene: Scene, cfg: ExtractConfig) -> dict:
    """The same first batch through our processors and through the script's."""
    prepared = ex.prepare(scene, _without_prior(cfg))
    batch = draw_batch(prepared.tensors, None, cfg, rng=random.Random(cfg.seed),
                       gen=torch.Generator(device=ex.device).manual_seed(cfg.seed),
                       encode_subset=ex.assets.encode_subset,
                       num_train_timesteps=ex.models.scheduler.config.num_train_timesteps)
    m = ex.models
    flow = AuthorsFlow(ex, prepared, [], _without_prior(cfg))
    with torch.no_grad(), autocast_context(ex.device, cfg.mixed_precision):
        ours = training_step(m.unet, m.text_encoder, m.scheduler, ex.store, batch, cfg)
        with flow.installed():
            theirs = training_step(m.unet, m.text_encoder, m.scheduler, flow.store, batch, cfg)
    ex.reset()
    return {"ours": float(ours.total), "authors": float(theirs.total),
            "abs_diff": abs(float(ours.total) - float(theirs.total))}


def run_authors_flow(model_folder: str, scene: Scene, cfg: ExtractConfig, device: torch.device) -> dict:
    """One scene, the script's way. Returns seconds per part."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    ex = Extractor(model_folder, device=str(device), max_concepts=cfg.max_concepts, progress=False)
    times["load"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as class_dir:
        clock = time.perf_counter()
        prepared = ex.prepare(scene, _without_prior(cfg))  # tokens and masks as ours
        resolution = cfg.resolution or ex.models.native_resolution
        files = generate_class_files(ex, cfg, resolution, Path(class_dir)) if cfg.prior.enabled else []
        times["prepare"] = time.perf_counter() - clock
        flow = AuthorsFlow(ex, prepared, files, cfg)
        ex.models.unet.train()
        ex.models.text_encoder.train()
        with flow.installed():
            p1 = flow.run_phase("authors phase 1", cfg.phase1_steps, flow.setup("phase1"))
            p2 = flow.run_phase("authors phase 2", cfg.phase2_steps, flow.setup("phase2"))
    times["phase1"], times["phase2"] = p1.seconds, p2.seconds
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the whole pipeline, every scene
        ex.models.save_pretrained(tmp)
    times["save"] = time.perf_counter() - clock
    times["total"] = time.perf_counter() - start
    return times
