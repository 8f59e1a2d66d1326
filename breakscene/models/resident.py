"""The resident models: loaded once per process on one device, with the runtime levers
applied (channels-last, torch.compile, gradient checkpointing), and reset to the pristine
base model after every scene without reading anything from disk."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from breakscene.method.attention import AttentionStore, install_capture
from breakscene.config import ExtractConfig, RuntimeConfig
from breakscene.extraction.generate import models_pipeline
from breakscene.models.memory import GIB, predict_step_memory
from breakscene.models.loading import load_any, pick_device
from breakscene.method.phases import PhaseSetup, phase2_mode
from breakscene.method.phases import phase_setup, set_checkpointing
from breakscene.extraction.tensors import encode_latents

log = logging.getLogger(__name__)


class ResidentModels:
    """UNet, VAE, text encoder(s), tokenizer(s) and scheduler (``models``), frozen, with the
    attention capture installed on the loss layers (``store`` receives the maps); ``backbone``
    is what differs between model families (``models.backbones``)."""

    def __init__(self, model: str = "tiny", revision: str | None = None, device: str | None = None,
                 runtime: RuntimeConfig | None = None) -> None:
        self.device = pick_device(device)
        self.runtime = runtime or RuntimeConfig()
        self.models = load_any(model, revision).to(self.device)
        m = self.models
        self.backbone = m.backbone()
        if not isinstance(m.scheduler, DDPMScheduler):
            # training noises as the models were trained (SDXL ships Euler, a sampler); every
            # sampler is built from this config, as for Stable Diffusion 1.x/2.x folders
            m.scheduler = DDPMScheduler.from_config(m.scheduler.config)
        for module in (m.vae, m.unet, *m.text_encoders):
            module.requires_grad_(False)
        self.store = AttentionStore()
        self.capture_downsample = 4
        install_capture(m.unet, self.store, self.capture_downsample)
        self._pristine_weights: dict | None = None  # taken before the first `full` phase 2
        self._to_undo: list = []  # the phase-2 modes this scene ran, undone by ``reset``
        self.generation = 0  # counts resets: a TrainedScene of an earlier one is stale
        self._checkpointing_cache: dict[tuple, bool] = {}
        if self.runtime.channels_last:
            m.unet.to(memory_format=torch.channels_last)
        if self.runtime.compile:
            m.unet.compile(backend=self.runtime.compile_backend)  # in place: names and hooks stay

    def use_capture(self, downsample: int) -> None:
        """Capture the maps at latent / ``downsample`` (the loss layers move with it)."""
        if downsample != self.capture_downsample:
            install_capture(self.models.unet, self.store, downsample)
            self.capture_downsample = downsample

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_latents(self.models.vae, pixels, self.device)

    def phase_setup(self, phase: str, cfg: ExtractConfig, *, after_step: Callable[[], None] | None = None) -> PhaseSetup:
        """``phases.phase_setup`` on the resident models, remembering what ``reset`` undoes:
        the pristine weights are copied to the CPU before the first `full` phase 2."""
        unet, te = self.models.unet, self.text_encoders
        if phase == "phase2":
            mode = phase2_mode(cfg)
            self._pristine_weights = mode.snapshot(unet, te, self._pristine_weights)
            self._to_undo.append(mode)
        return phase_setup(phase, cfg, unet, te, after_step=after_step)

    def wants_checkpointing(self, phase: str, cfg: ExtractConfig, resolution: int) -> bool:
        """"on"/"off" as configured; "auto": only where the predicted peak of ``phase``
        would not fit the CUDA device (the prediction is cached per setting)."""
        mode = self.runtime.gradient_checkpointing
        if mode != "auto" or self.device.type != "cuda":
            return mode == "on"
        key = (phase, resolution, cfg.model_dump_json())  # every setting the prediction may read
        if key not in self._checkpointing_cache:
            need = predict_step_memory(self.models, cfg, resolution, phase, checkpointing=False,
                                       optimizer=self.runtime.optimizer).total
            have = torch.cuda.get_device_properties(self.device).total_memory * self.runtime.memory_headroom
            self._checkpointing_cache[key] = need > have
            if need > have:
                log.info("%s: gradient checkpointing on (predicted %.1f GiB > %.1f GiB usable)",
                         phase, need / GIB, have / GIB)
        return self._checkpointing_cache[key]

    def set_checkpointing(self, on: bool) -> None:
        set_checkpointing(self.models.unet, self.text_encoders, on)

    def reset(self) -> None:
        """Back to the pristine base weights (the caller resets the embedding rows after)."""
        unet, te = self.models.unet, self.text_encoders
        while self._to_undo:
            self._to_undo.pop().undo(unet, te, self._pristine_weights)
        install_capture(unet, self.store, self.capture_downsample)  # removing adapters replaced layers
        self.generation += 1
        unet.requires_grad_(False)
        for encoder in te:
            encoder.requires_grad_(False)
        self.set_checkpointing(False)
        self.store.clear()

    @contextlib.contextmanager
    def loaded_layout(self):
        """The UNet in the memory layout a loader gives it (NCHW), so that a grid sampled
        here is bit for bit what the bundle generates once loaded; channels-last again after."""
        unet = self.models.unet
        if not self.runtime.channels_last:
            yield
            return
        unet.to(memory_format=torch.contiguous_format)
        try:
            yield
        finally:
            unet.to(memory_format=torch.channels_last)

    def set_training(self, on: bool) -> None:
        """The trained models (UNet, every text encoder) in train or eval mode."""
        for module in (self.models.unet, *self.text_encoders):
            module.train(on)

    @property
    def text_encoders(self) -> tuple:
        return self.models.text_encoders

    def pipeline(self, sampler: str = "ddim"):
        """A generation pipeline over the current (possibly trained) in-memory weights."""
        return models_pipeline(self.models, sampler)
