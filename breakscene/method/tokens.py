"""The new-token rows: one ``<asset{i}>`` per concept in every tokenizer and its text
encoder's embedding matrix, their per-scene initialisation, and prompt encoding."""
from __future__ import annotations

from collections.abc import Callable

import torch

from breakscene.errors import BreakSceneError
from breakscene.method.union_sampling import concept_prompt, token_names


def as_tuple(parts) -> tuple:
    """One model part or a tuple / list of them, as a tuple."""
    return tuple(parts) if isinstance(parts, (tuple, list)) else (parts,)


class AssetTokens:
    """Adds ``max_concepts`` tokens to every tokenizer (and rows to its text encoder) once;
    keeps the pristine embedding matrices so every scene starts from them.

    ``tokenizer`` / ``text_encoder``: one each (Stable Diffusion 1.x/2.x) or matching tuples
    (SDXL: CLIP ViT-L and OpenCLIP bigG). A prompt's ids are every tokenizer's ids side by
    side (``backbones.Backbone.ids``); token positions are the same in each, as the
    tokenizers share one vocabulary."""

    def __init__(self, tokenizer, text_encoder, max_concepts: int, device: torch.device | str = "cpu", *,
                 model_id: str = "the base model") -> None:
        self.tokenizers, self.text_encoders = as_tuple(tokenizer), as_tuple(text_encoder)
        self.tokenizer, self.text_encoder = self.tokenizers[0], self.text_encoders[0]
        self.device = torch.device(device)
        self.max_concepts = max_concepts
        self.base_vocab_sizes = [len(tok) for tok in self.tokenizers]
        self.base_vocab_size = self.base_vocab_sizes[0]
        self.names = token_names(max_concepts)
        self.ids_per_encoder: list[list[int]] = []
        self.base_rows_per_encoder: list[int] = []  # a saved text encoder keeps only these
        for tok, encoder in zip(self.tokenizers, self.text_encoders):
            if tok.add_tokens(self.names) != max_concepts:
                raise BreakSceneError(f"the tokenizer of {model_id!r} already holds one of {self.names}")
            ids = tok.convert_tokens_to_ids(self.names)
            self.ids_per_encoder.append(ids)
            self.base_rows_per_encoder.append(encoder.get_input_embeddings().num_embeddings)
            if max(ids) >= encoder.get_input_embeddings().num_embeddings:
                encoder.resize_token_embeddings(max(ids) + 1)
        self.ids: list[int] = self.ids_per_encoder[0]
        self.base_embedding_rows = self.base_rows_per_encoder[0]
        self.pristines = [e.weight.detach().clone() for e in self.embeddings]
        self.pristine = self.pristines[0]
        self.scene_rows = list(self.pristines)  # each matrix at the current scene's start (see init_rows)
        self._prompts: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    @property
    def embeddings(self) -> list[torch.nn.Embedding]:
        """Every text encoder's input embedding, in encoder order."""
        return [e.get_input_embeddings() for e in self.text_encoders]

    def _tokenize(self, text: str) -> torch.Tensor:
        return torch.cat([tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                              return_tensors="pt").input_ids for tok in self.tokenizers], dim=-1)

    def ids_for_text(self, text: str) -> torch.Tensor:
        """(1, L) padded input ids of ``text`` (every tokenizer's, side by side), on the device."""
        return self._tokenize(text).to(self.device)

    def encode_prompt(self, tokens: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, L), positions of ``tokens`` in the first tokenizer's ids) of
        "a photo of <t1> and <t2>...", cached per token tuple."""
        if tokens not in self._prompts:
            ids = self._tokenize(concept_prompt(list(tokens)) if tokens else "")
            positions = [self.position(ids, t) for t in tokens]
            self._prompts[tokens] = (ids.to(self.device), torch.tensor(positions, device=self.device))
        return self._prompts[tokens]

    def position(self, ids: torch.Tensor, token: str) -> int:
        """Where ``token`` sits in each tokenizer's part of ``ids`` (the same place in each)."""
        places = set()
        for tok, part in zip(self.tokenizers, ids[0].split([t.model_max_length for t in self.tokenizers])):
            hits = (part == tok.convert_tokens_to_ids(token)).nonzero().flatten()
            if len(hits) != 1:
                raise RuntimeError(f"token {token} found {len(hits)} times in its prompt")
            places.add(int(hits[0]))
        if len(places) != 1:
            raise RuntimeError(f"token {token} sits at different places in the tokenizers' prompts")
        return places.pop()

    def encode_subset(self, subset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_prompt`` of the tokens of concepts ``subset``, in that order."""
        return self.encode_prompt(tuple(self.names[i] for i in subset))

    def init_rows(self, n: int, init_words: list[str | None] | None = None) -> list[str | None]:
        """Reset the matrices; each of the first ``n`` new rows starts from its initializer word's
        first sub-token (in each encoder, that encoder's row of it), else from an existing
        vocabulary row (the authors' default)."""
        words = list(init_words or []) + [None] * n
        used = [(words[i] or "").strip() or None for i in range(n)]
        for k, (tok, emb) in enumerate(zip(self.tokenizers, self.embeddings)):
            weight = emb.weight.data
            weight.copy_(self.pristines[k])
            for i, word in enumerate(used):
                src = self.base_vocab_sizes[k] - 2 * self.max_concepts + i
                if word:
                    ids = tok(word, add_special_tokens=False).input_ids
                    if not ids:
                        raise BreakSceneError(f"initializer word {word!r} has no token")
                    src = ids[0]
                weight[self.ids_per_encoder[k][i]] = weight[src]
            self.scene_rows[k] = weight.detach().clone()
        return used

    def keep_only_new_rows(self, n: int) -> Callable[[], None]:
        """An after-step hook: every row but the scene's ``n`` new ones, in every matrix, goes
        back to its value at the scene's start (weight decay and Adam would otherwise move them)."""
        kept = []
        for emb, ids, start in zip(self.embeddings, self.ids_per_encoder, self.scene_rows):
            keep_new = torch.zeros(emb.num_embeddings, 1, dtype=torch.bool, device=self.device)
            keep_new[ids[:n]] = True
            kept.append((emb.weight, keep_new, start))

        def restore() -> None:
            with torch.no_grad():
                for weight, keep_new, start in kept:
                    weight.copy_(torch.where(keep_new, weight, start))
        return restore

    def reset(self) -> None:
        with torch.no_grad():
            for emb, pristine in zip(self.embeddings, self.pristines):
                emb.weight.copy_(pristine)
