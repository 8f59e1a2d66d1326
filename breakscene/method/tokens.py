"""The new-token rows: one ``<asset{i}>`` per concept in the tokenizer and the text
encoder's embedding matrix, their per-scene initialisation, and prompt encoding."""
from __future__ import annotations

from collections.abc import Callable

import torch

from breakscene.errors import BreakSceneError
from breakscene.method.union_sampling import concept_prompt, token_names


class AssetTokens:
    """Adds ``max_concepts`` tokens to ``tokenizer`` (and rows to ``text_encoder``) once;
    keeps the pristine embedding matrix so every scene starts from it."""

    def __init__(self, tokenizer, text_encoder, max_concepts: int, device: torch.device | str = "cpu", *,
                 model_id: str = "the base model") -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.device = torch.device(device)
        self.max_concepts = max_concepts
        self.base_vocab_size = len(tokenizer)
        self.names = token_names(max_concepts)
        if tokenizer.add_tokens(self.names) != max_concepts:
            raise BreakSceneError(f"the tokenizer of {model_id!r} already holds one of {self.names}")
        self.ids: list[int] = tokenizer.convert_tokens_to_ids(self.names)
        self.base_embedding_rows = self.embedding.num_embeddings  # a saved text encoder keeps only these
        if max(self.ids) >= self.embedding.num_embeddings:
            text_encoder.resize_token_embeddings(max(self.ids) + 1)
        self.pristine = self.embedding.weight.detach().clone()
        self.scene_rows = self.pristine  # the matrix at the current scene's start (see init_rows)
        self._prompts: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def _tokenize(self, text: str) -> torch.Tensor:
        tok = self.tokenizer
        return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def ids_for_text(self, text: str) -> torch.Tensor:
        """(1, L) padded input ids of ``text``, on the device."""
        return self._tokenize(text).to(self.device)

    def encode_prompt(self, tokens: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, L), positions of ``tokens`` in it) of "a photo of <t1> and <t2>...",
        cached per token tuple."""
        if tokens not in self._prompts:
            ids = self._tokenize(concept_prompt(list(tokens)) if tokens else "")
            positions = []
            for t in tokens:
                hits = (ids[0] == self.tokenizer.convert_tokens_to_ids(t)).nonzero().flatten()
                if len(hits) != 1:
                    raise RuntimeError(f"token {t} found {len(hits)} times in its prompt")
                positions.append(int(hits[0]))
            self._prompts[tokens] = (ids.to(self.device), torch.tensor(positions, device=self.device))
        return self._prompts[tokens]

    def encode_subset(self, subset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_prompt`` of the tokens of concepts ``subset``, in that order."""
        return self.encode_prompt(tuple(self.names[i] for i in subset))

    def init_rows(self, n: int, init_words: list[str | None] | None = None) -> list[str | None]:
        """Reset the matrix; each of the first ``n`` new rows starts from its initializer word's
        first sub-token, else from an existing vocabulary row (the authors' default)."""
        weight = self.embedding.weight.data
        weight.copy_(self.pristine)
        words = list(init_words or []) + [None] * n
        used = []
        for i in range(n):
            word = (words[i] or "").strip() or None
            if word:
                ids = self.tokenizer(word, add_special_tokens=False).input_ids
                if not ids:
                    raise BreakSceneError(f"initializer word {word!r} has no token")
                src = ids[0]
            else:
                src = self.base_vocab_size - 2 * self.max_concepts + i
            weight[self.ids[i]] = weight[src]
            used.append(word)
        self.scene_rows = weight.detach().clone()
        return used

    def keep_only_new_rows(self, n: int) -> Callable[[], None]:
        """An after-step hook: every row but the scene's ``n`` new ones goes back to its value
        at the scene's start (weight decay and Adam would otherwise move them)."""
        keep_new = torch.zeros(self.embedding.num_embeddings, 1, dtype=torch.bool, device=self.device)
        keep_new[self.ids[:n]] = True
        weight, start = self.embedding.weight, self.scene_rows

        def restore() -> None:
            with torch.no_grad():
                weight.copy_(torch.where(keep_new, weight, start))
        return restore

    def reset(self) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(self.pristine)
