"""The Extractor: models loaded once, many scenes in a row, each from pristine weights.

Per scene: 1. prepare image and masks, 2. initialise the asset tokens, 3. cache image and
class latents (one per flip), 4. phase 1 (token embeddings only), 5. phase 2 (full
UNet + text encoder, or LoRA), 6. attention diagnostic, 7. bundle, 8. reset.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import bundle as bundle_io
from . import masks as M
from . import modelcard
from . import prior as prior_io
from .attention import AttentionStore, install_capture, token_maps
from .config import ExtractConfig, RuntimeConfig
from .errors import BreakSceneError, SceneError
from .generate import fused_attention, grid_batch, make_pipeline, sample_grid, sampler_record
from .lora import add_lora, lora_state_dicts, remove_lora
from .memory import GIB, predict_step_memory
from .metrics import attention_diagnostic
from .models import load_models, pick_device
from .sampling import concept_prompt, sample_subset, token_names
from .scene import PreparedScene, Scene, prepare_scene
from .storage import join, publish_dir
from .training import Batch, autocast_context, run_phase, training_step

log = logging.getLogger(__name__)


@dataclass
class SceneTensors:
    """Everything about one scene the step loop reads, on the device, per flip (0, 1)."""

    latent_mean: list[torch.Tensor]  # (1, 4, h, w), already scaled
    latent_std: list[torch.Tensor]
    masks: list[torch.Tensor]  # (N, R, R) full-resolution float masks
    latent_size: tuple[int, int]
    attn_size: tuple[int, int]
    pixels: torch.Tensor | None = None  # (3, R, R) in [-1, 1], unflipped, on the CPU
    subset_cache: dict = field(default_factory=dict)


@dataclass
class ClassTensors:
    latent_mean: list[torch.Tensor]  # (K, 4, h, w) per flip
    latent_std: list[torch.Tensor]
    input_ids: torch.Tensor  # (1, L)


@dataclass
class ExtractionResult:
    tokens: list[str]
    concepts: list[dict]
    losses: dict
    timings: dict
    image_hash: str
    bundle_uri: str | None = None
    grid_uri: str | None = None
    attention_maps: np.ndarray | None = field(default=None, repr=False)
    evaluation: dict | None = None  # what the ``evaluate`` hook returned
    runtime: dict = field(default_factory=dict)  # how it ran: checkpointing per phase, peak memory

    @property
    def final_loss(self) -> float | None:
        for phase in ("phase2", "phase1"):
            if "total" in self.losses.get(phase, {}):
                return self.losses[phase]["total"]["last"]
        return None


class Extractor:
    def __init__(self, model: str = "tiny", revision: str | None = None, device: str | None = None,
                 max_concepts: int = 4, progress: bool = True, runtime: RuntimeConfig | None = None) -> None:
        start = time.perf_counter()
        self.device = pick_device(device)
        self.runtime = runtime or RuntimeConfig()
        self.models = load_models(model, revision).to(self.device)
        self.max_concepts = max_concepts
        self.progress = progress
        m = self.models
        m.vae.requires_grad_(False)
        m.unet.requires_grad_(False)
        m.text_encoder.requires_grad_(False)
        self.base_vocab_size = len(m.tokenizer)
        self.tokens = token_names(max_concepts)
        if m.tokenizer.add_tokens(self.tokens) != max_concepts:
            raise BreakSceneError(f"the tokenizer of {model!r} already holds one of {self.tokens}")
        self.token_ids = m.tokenizer.convert_tokens_to_ids(self.tokens)
        self.base_embedding_rows = self._embedding.num_embeddings
        if max(self.token_ids) >= self._embedding.num_embeddings:
            m.text_encoder.resize_token_embeddings(max(self.token_ids) + 1)
        self.store = AttentionStore()
        self._capture_downsample = 4
        self.loss_layers = install_capture(m.unet, self.store, self._capture_downsample)
        self._pristine_embeddings = self._embedding.weight.detach().clone()
        self._pristine_weights: dict | None = None  # taken before the first `full` phase 2
        self._dirty_full = False
        self._lora_active = False
        self._class_cache: dict[tuple, ClassTensors] = {}
        self._prompt_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._checkpointing_cache: dict[tuple, bool] = {}
        if self.runtime.channels_last:
            m.unet.to(memory_format=torch.channels_last)
        if self.runtime.compile:
            m.unet.compile(backend=self.runtime.compile_backend)  # in place: names and hooks stay
        self.load_seconds = time.perf_counter() - start

    # -- small helpers ---------------------------------------------------------------
    @property
    def _embedding(self) -> torch.nn.Embedding:
        return self.models.text_encoder.get_input_embeddings()

    def _encode_prompt(self, tokens: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, L), positions of ``tokens`` in it), cached per token tuple."""
        if tokens not in self._prompt_cache:
            tok = self.models.tokenizer
            ids = tok(concept_prompt(list(tokens)) if tokens else "", padding="max_length",
                      max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            positions = []
            for t in tokens:
                hits = (ids[0] == tok.convert_tokens_to_ids(t)).nonzero().flatten()
                if len(hits) != 1:
                    raise RuntimeError(f"token {t} found {len(hits)} times in its prompt")
                positions.append(int(hits[0]))
            self._prompt_cache[tokens] = (ids.to(self.device), torch.tensor(positions, device=self.device))
        return self._prompt_cache[tokens]

    def _ids_for_text(self, text: str) -> torch.Tensor:
        tok = self.models.tokenizer
        return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def _encode_latents(self, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.models.vae
        scale = vae.config.scaling_factor
        means, stds = [], []
        for chunk in pixels.split(batch):
            with autocast_context(self.device, "bf16"):
                dist = vae.encode(chunk.to(self.device)).latent_dist
            means.append(dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
        return torch.cat(means), torch.cat(stds)

    def _check_resolution(self, resolution: int, cfg: ExtractConfig) -> tuple[int, int]:
        latent = resolution // self.models.vae_scale
        unet_multiple = 2 ** (len(self.models.unet.down_blocks) - 1)
        if resolution % self.models.vae_scale or latent % max(unet_multiple, cfg.attn_downsample):
            raise BreakSceneError(
                f"resolution {resolution} must be a multiple of {self.models.vae_scale * max(unet_multiple, cfg.attn_downsample)}"
                f" for model {self.models.model_id!r}")
        return latent, latent // cfg.attn_downsample

    # -- per-scene preparation -------------------------------------------------------
    def _init_tokens(self, n: int, init_words: list[str | None] | None) -> list[str | None]:
        """Reset the embedding matrix; each new row starts from its initializer word's first
        sub-token, else from an existing vocabulary row (the authors' default)."""
        weight = self._embedding.weight.data
        weight.copy_(self._pristine_embeddings)
        words = list(init_words or []) + [None] * n
        used = []
        for i in range(n):
            word = (words[i] or "").strip() or None
            if word:
                ids = self.models.tokenizer(word, add_special_tokens=False).input_ids
                if not ids:
                    raise BreakSceneError(f"initializer word {word!r} has no token")
                src = ids[0]
            else:
                src = self.base_vocab_size - 2 * self.max_concepts + i
            weight[self.token_ids[i]] = weight[src]
            used.append(word)
        self._scene_embeddings = weight.detach().clone()
        return used

    def _scene_tensors(self, prepared: PreparedScene, cfg: ExtractConfig) -> SceneTensors:
        pixels = torch.stack([prepared.pixels, prepared.pixels.flip(-1)])
        mean, std = self._encode_latents(pixels)
        masks = prepared.masks.to(self.device)
        latent = mean.shape[-1]
        attn = latent // cfg.attn_downsample
        return SceneTensors(latent_mean=[mean[0:1], mean[1:2]], latent_std=[std[0:1], std[1:2]],
                            masks=[masks, masks.flip(-1)], latent_size=(latent, latent), attn_size=(attn, attn),
                            pixels=prepared.pixels)

    def _class_tensors(self, cfg: ExtractConfig, resolution: int) -> ClassTensors:
        p = cfg.prior
        key = (p.class_data_dir, p.class_prompt, p.num_class_images, p.generation_steps, resolution)
        if key not in self._class_cache:
            images = prior_io.class_images(self.models, p, resolution, self.progress)
            pixels = prior_io.to_pixels(images)
            mean, std = self._encode_latents(pixels)
            mean_f, std_f = self._encode_latents(pixels.flip(-1))
            self._class_cache[key] = ClassTensors([mean, mean_f], [std, std_f], self._ids_for_text(p.class_prompt))
        return self._class_cache[key]

    def _subset_masks(self, data: SceneTensors, flip: int, subset: tuple[int, ...]):
        """(attention-size masks of the subset, latent-size union mask), cached per subset."""
        key = (flip, subset)
        if key not in data.subset_cache:
            chosen = data.masks[flip][list(subset)]
            attn = M.downsample(chosen, data.attn_size)
            union = M.downsample(chosen.amax(0, keepdim=True), data.latent_size)  # (1, h, w)
            data.subset_cache[key] = (attn, union)
        return data.subset_cache[key]

    def _draw_batch(self, rng: random.Random, gen: torch.Generator, data: SceneTensors,
                    cls: ClassTensors | None, cfg: ExtractConfig, n: int) -> Batch:
        """All random draws of one step: subsets and flips (host RNG), noise, timesteps and
        latent samples (device RNG), so the step itself is deterministic."""
        dev, B = self.device, cfg.batch_size
        T = self.models.scheduler.config.num_train_timesteps
        latents, ids, positions, attn_masks, unions = [], [], [], [], []
        for _ in range(B):
            subset = tuple(sample_subset(rng, n))
            flip = int(rng.random() < cfg.flip_p)
            mean, std = data.latent_mean[flip], data.latent_std[flip]
            latents.append(mean + std * torch.randn(mean.shape, generator=gen, device=dev))
            prompt_ids, pos = self._encode_prompt(tuple(self.tokens[i] for i in subset))
            attn, union = self._subset_masks(data, flip, subset)
            ids.append(prompt_ids)
            positions.append(pos)
            attn_masks.append(attn)
            unions.append(union)
        latents_t = torch.cat(latents)
        batch = Batch(latents=latents_t, input_ids=torch.cat(ids), token_positions=positions, attn_masks=attn_masks,
                      union_mask=torch.stack(unions), noise=torch.randn(latents_t.shape, generator=gen, device=dev),
                      timesteps=torch.randint(0, T, (B,), generator=gen, device=dev))
        if cls is not None:
            flip = int(rng.random() < cfg.flip_p)
            idx = torch.randint(0, cls.latent_mean[flip].shape[0], (B,), generator=gen, device=dev)
            mean, std = cls.latent_mean[flip][idx], cls.latent_std[flip][idx]
            batch.class_latents = mean + std * torch.randn(mean.shape, generator=gen, device=dev)
            batch.class_input_ids = cls.input_ids.expand(B, -1)
            batch.class_noise = torch.randn(mean.shape, generator=gen, device=dev)
            batch.class_timesteps = torch.randint(0, T, (B,), generator=gen, device=dev)
        return batch

    # -- phases ----------------------------------------------------------------------
    def _restore_other_rows(self, n: int):
        """Phase-1 hygiene: every embedding row but this scene's new ones goes back."""
        keep_new = torch.zeros(self._embedding.num_embeddings, 1, dtype=torch.bool, device=self.device)
        keep_new[self.token_ids[:n]] = True
        weight = self._embedding.weight

        def restore():
            with torch.no_grad():
                weight.copy_(torch.where(keep_new, weight, self._scene_embeddings))
        return restore

    def _setup_phase2(self, cfg: ExtractConfig, n: int):
        unet, te = self.models.unet, self.models.text_encoder
        emb = self._embedding.weight
        if cfg.phase2_mode == "full":
            if self._pristine_weights is None:
                self._pristine_weights = {
                    "unet": {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()},
                    "text_encoder": {k: v.detach().to("cpu", copy=True) for k, v in te.state_dict().items()},
                }
            self._dirty_full = True
            unet.requires_grad_(True)
            te.requires_grad_(True)
            params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
            return [{"params": params, "lr": cfg.phase2_lr}], params, lambda: None
        lora_params = add_lora(unet, te if cfg.lora.text_encoder else None, cfg.lora)
        self._lora_active = True
        emb.requires_grad_(True)
        groups = [{"params": lora_params, "lr": cfg.lora.lr}, {"params": [emb], "lr": cfg.phase2_lr}]
        return groups, lora_params + [emb], self._restore_other_rows(n)

    def _wants_checkpointing(self, phase: str, cfg: ExtractConfig, resolution: int) -> bool:
        """"on"/"off" as configured; "auto": only where the predicted peak of ``phase``
        would not fit the CUDA device (the prediction is cached per setting)."""
        mode = self.runtime.gradient_checkpointing
        if mode != "auto" or self.device.type != "cuda":
            return mode == "on"
        key = (phase, cfg.phase2_mode, cfg.batch_size, cfg.prior.enabled, cfg.mixed_precision, resolution,
               cfg.lora.rank, cfg.lora.text_encoder)
        if key not in self._checkpointing_cache:
            need = predict_step_memory(self.models, cfg, resolution, phase, checkpointing=False).total
            have = torch.cuda.get_device_properties(self.device).total_memory * self.runtime.memory_headroom
            self._checkpointing_cache[key] = need > have
            if need > have:
                log.info("%s: gradient checkpointing on (predicted %.1f GiB > %.1f GiB usable)",
                         phase, need / GIB, have / GIB)
        return self._checkpointing_cache[key]

    def _set_checkpointing(self, on: bool) -> None:
        unet, te = self.models.unet, self.models.text_encoder
        if on == unet.is_gradient_checkpointing:
            return
        if on:
            unet.enable_gradient_checkpointing()
            te.activation_checkpointing_enable()
        else:
            unet.disable_gradient_checkpointing()
            te.activation_checkpointing_disable()

    def _reset(self) -> None:
        """Back to the pristine base model, without reading anything from disk."""
        unet, te = self.models.unet, self.models.text_encoder
        if self._lora_active:
            remove_lora(unet, te)
            self._lora_active = False
            install_capture(unet, self.store, self._capture_downsample)
        if self._dirty_full and self._pristine_weights is not None:
            unet.load_state_dict(self._pristine_weights["unet"])
            te.load_state_dict(self._pristine_weights["text_encoder"])
            self._dirty_full = False
        with torch.no_grad():
            self._embedding.weight.copy_(self._pristine_embeddings)
        unet.requires_grad_(False)
        te.requires_grad_(False)
        self._set_checkpointing(False)
        self.store.clear()

    # -- diagnostic --------------------------------------------------------------------
    @torch.no_grad()
    def _attention_maps(self, data: SceneTensors, cfg: ExtractConfig, n: int) -> torch.Tensor:
        """Each token's map for the all-concepts prompt, averaged over fixed timesteps and
        a fixed noise seed, on the unflipped image's mean latent."""
        ids, positions = self._encode_prompt(tuple(self.tokens[:n]))
        latents = data.latent_mean[0]
        gen = torch.Generator(device=self.device).manual_seed(cfg.diagnostic_seed)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        states = self.models.text_encoder(ids)[0]
        total = torch.zeros(n, *data.attn_size, device=self.device)
        self.store.enabled = True
        for t in cfg.diagnostic_timesteps:
            ts = torch.tensor([t], device=self.device)
            self.store.clear()
            with autocast_context(self.device, cfg.mixed_precision):
                self.models.unet(self.models.scheduler.add_noise(latents, noise, ts), ts, states)
            total += token_maps(self.store.mean_map(), 0, positions, data.attn_size).float()
        return total / len(cfg.diagnostic_timesteps)

    # -- the public entry point ------------------------------------------------------
    def extract(self, scene: Scene, config: ExtractConfig | None = None, out: str | None = None,
                init_words: list[str | None] | None = None, evaluate=None) -> ExtractionResult:
        """Learn one token per mask of ``scene``; write a bundle to ``out`` when given.

        ``evaluate(extractor, scene_tensors, n)``, when given, runs on the trained weights
        before they are reset (the robustness study measures through it)."""
        cfg = config or ExtractConfig()
        self.last_config = cfg
        n = scene.num_concepts
        if n > min(cfg.max_concepts, self.max_concepts):
            raise SceneError(f"{scene.image_name} has {n} masks, more than max_concepts="
                             f"{min(cfg.max_concepts, self.max_concepts)}")
        resolution = cfg.resolution or self.models.native_resolution
        self._check_resolution(resolution, cfg)
        if cfg.attn_downsample != self._capture_downsample:
            self.loss_layers = install_capture(self.models.unet, self.store, cfg.attn_downsample)
            self._capture_downsample = cfg.attn_downsample
        timings: dict[str, float] = {"model_load": round(self.load_seconds, 3)}
        clock = time.perf_counter()
        rng = random.Random(cfg.seed)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        try:
            # 1-3. inputs, tokens and cached latents
            prepared = prepare_scene(scene, resolution)
            words = self._init_tokens(n, init_words)
            data = self._scene_tensors(prepared, cfg)
            timings["prepare"] = round(time.perf_counter() - clock, 3)
            clock = time.perf_counter()  # generated once per extractor and setting, then cached
            cls = self._class_tensors(cfg, resolution) if cfg.prior.enabled else None
            timings["class_images"] = round(time.perf_counter() - clock, 3)
            m = self.models

            def step():
                return training_step(m.unet, m.text_encoder, m.scheduler, self.store,
                                     self._draw_batch(rng, gen, data, cls, cfg, n), cfg)

            # 4. phase 1: the new token rows only
            emb = self._embedding.weight
            emb.requires_grad_(True)
            m.unet.train()
            m.text_encoder.train()
            checkpointing = {}
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            checkpointing["phase1"] = self._wants_checkpointing("phase1", cfg, resolution)
            self._set_checkpointing(checkpointing["phase1"])
            p1 = run_phase("phase 1", cfg.phase1_steps, [{"params": [emb], "lr": cfg.phase1_lr}], [emb],
                           step, self._restore_other_rows(n), cfg, self.device, self.progress)
            # 5. phase 2: UNet + text encoder (full) or their LoRA adapters
            # decided before the adapters exist: the prediction adds its own to a meta copy
            checkpointing["phase2"] = self._wants_checkpointing("phase2", cfg, resolution)
            groups, trainable, after = self._setup_phase2(cfg, n)
            self._set_checkpointing(checkpointing["phase2"])
            p2 = run_phase(f"phase 2 ({cfg.phase2_mode})", cfg.phase2_steps, groups, trainable, step, after,
                           cfg, self.device, self.progress)
            m.unet.eval()
            m.text_encoder.eval()
            timings["phase1"], timings["phase2"] = round(p1.seconds, 3), round(p2.seconds, 3)
            # 6. attention diagnostic against every mask
            clock = time.perf_counter()
            maps = self._attention_maps(data, cfg, n)
            ref = (M.downsample(data.masks[0], data.attn_size) >= 0.5).cpu().numpy()
            diag = attention_diagnostic(maps.cpu().numpy(), ref, cfg.diagnostic_threshold)
            timings["diagnostic"] = round(time.perf_counter() - clock, 3)
            concepts = [{"index": i, "token": self.tokens[i], "init_word": words[i], **d} for i, d in enumerate(diag)]
            result = ExtractionResult(tokens=self.tokens[:n], concepts=concepts,
                                      losses={"phase1": p1.summary(), "phase2": p2.summary()},
                                      timings=timings, image_hash=scene.image_hash,
                                      attention_maps=maps.cpu().numpy(),
                                      runtime={"gradient_checkpointing": checkpointing,
                                               **self.runtime.model_dump(exclude={"gradient_checkpointing"})})
            if self.device.type == "cuda":
                result.runtime["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
            if evaluate is not None:
                clock = time.perf_counter()
                result.evaluation = evaluate(self, data, n)
                timings["evaluate"] = round(time.perf_counter() - clock, 3)
            # 7. the bundle (its sample grid timed on its own)
            if out is not None:
                clock = time.perf_counter()
                self._write_bundle(out, scene, prepared, cfg, result, resolution)
                timings["bundle_write"] = round(time.perf_counter() - clock - timings.get("grid", 0.0), 3)
            return result
        finally:
            # 8. pristine weights for the next scene, whatever happened
            self._reset()

    @contextlib.contextmanager
    def _loaded_layout(self):
        """The UNet in the memory layout a loader gives it (NCHW), so that the bundle's grid
        is bit for bit what the bundle generates once loaded; channels-last again after."""
        unet = self.models.unet
        if not self.runtime.channels_last:
            yield
            return
        unet.to(memory_format=torch.contiguous_format)
        try:
            yield
        finally:
            unet.to(memory_format=torch.channels_last)

    def pipeline(self, sampler: str = "ddim"):
        """A generation pipeline over the current (trained) in-memory weights."""
        m = self.models
        return make_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, m.scheduler.config, sampler)

    def _write_bundle(self, out: str, scene: Scene, prepared: PreparedScene, cfg: ExtractConfig,
                      result: ExtractionResult, resolution: int) -> None:
        with tempfile.TemporaryDirectory(prefix="bundle-") as tmp_name:
            tmp = Path(tmp_name)
            files: dict = {"embeddings": [], "masks": []}
            # Token embeddings: one diffusers textual-inversion file per token.
            (tmp / "embeddings").mkdir()
            weight = self._embedding.weight.detach()
            for i, token in enumerate(result.tokens):
                rel = f"embeddings/asset{i}.safetensors"
                save_file({token: weight[self.token_ids[i]].float().cpu().contiguous()}, tmp / rel)
                files["embeddings"].append(rel)
            # Phase-2 weights; LoRA at the root, where `pipe.load_lora_weights(bundle)` looks.
            if cfg.phase2_mode == "lora":
                unet_sd, te_sd, meta = lora_state_dicts(self.models.unet, self.models.text_encoder
                                                        if cfg.lora.text_encoder else None)
                from diffusers import StableDiffusionPipeline

                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_sd,
                                                          text_encoder_lora_layers=te_sd, **meta)
                files["lora"] = "pytorch_lora_weights.safetensors"
                if not (tmp / files["lora"]).is_file():
                    raise RuntimeError(f"diffusers wrote no {files['lora']}")
            else:
                self.models.unet.save_pretrained(tmp / "unet")
                bundle_io.save_text_encoder(self.models.text_encoder, self.base_embedding_rows, tmp / "text_encoder")
                files["unet"], files["text_encoder"] = "unet", "text_encoder"
            # The image and masks exactly as trained on (after orientation, crop and resize):
            # the pixels are uint8 / 127.5 - 1, so the PNG holds them without loss.
            image = ((prepared.pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / "image.png")
            files["image"] = "image.png"
            (tmp / "masks").mkdir()
            for i, mask in enumerate(prepared.masks):
                rel = f"masks/mask{i}.png"
                Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(tmp / rel)
                files["masks"].append(rel)
            # Diagnostics in their own folder: diffusers' LoRA loader reads the root's .safetensors.
            (tmp / "diagnostics").mkdir()
            files["attention_maps"] = "diagnostics/attention_maps.safetensors"
            save_file({"maps": torch.from_numpy(result.attention_maps).contiguous()}, tmp / files["attention_maps"])
            # The sample grid: one batched call; its sampler is saved for diffusers' loaders.
            pipe = self.pipeline(cfg.grid_scheduler)
            seeds = list(range(cfg.grid_seeds))
            prompts, batch_seeds = grid_batch(result.tokens, seeds) if seeds else ([], [])
            if seeds:
                clock = time.perf_counter()
                with fused_attention(self.models.unet), self._loaded_layout():
                    grid = sample_grid(pipe, result.tokens, seeds, cfg.grid_inference_steps, cfg.guidance_scale,
                                       resolution)
                result.timings["grid"] = round(time.perf_counter() - clock, 3)
                grid.save(tmp / "grid.png")
                files["grid"] = "grid.png"
            pipe.scheduler.save_pretrained(tmp / "scheduler")
            files["scheduler"] = "scheduler"
            sampler = sampler_record(pipe, steps=cfg.grid_inference_steps, guidance_scale=cfg.guidance_scale,
                                     height=resolution, width=resolution, seeds=batch_seeds, prompts=prompts)
            model_id, revision = self.models.model_id, self.models.revision
            manifest = bundle_io.manifest(
                tokens=result.tokens, phase2_mode=cfg.phase2_mode, resolution=resolution,
                model={"id": model_id, "revision": revision, "preset": self.models.is_preset,
                       **bundle_io.base_reference(model_id, revision, self.models.is_preset)},
                sampler=sampler,
                config=cfg.model_dump(mode="json"), losses=result.losses, timings=result.timings,
                runtime=result.runtime,
                image={"name": scene.image_name, "sha256": scene.image_hash, "width": scene.image.width,
                       "height": scene.image.height},
                concepts=[{**c, "mask": files["masks"][c["index"]]} for c in result.concepts],
                files=files, warnings=scene.warnings,
            )
            files["card"] = "README.md"
            bundle_path, base, base_comment = bundle_io.card_paths(manifest, out)
            (tmp / "README.md").write_text(modelcard.render(manifest, bundle_path=bundle_path, base=base,
                                                            base_comment=base_comment))
            (tmp / bundle_io.MARKER).write_text(json.dumps(manifest, indent=2))
            publish_dir(tmp, out, bundle_io.MARKER)
        result.bundle_uri = out
        result.grid_uri = join(out, "grid.png") if "grid" in files else None
