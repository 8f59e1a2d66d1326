"""Union sampling: each training example learns a random non-empty subset of the concepts."""
from __future__ import annotations

import random


def token_names(num_concepts: int) -> list[str]:
    return [f"<asset{i}>" for i in range(num_concepts)]


def sample_subset(rng: random.Random, num_concepts: int) -> list[int]:
    """A random non-empty subset, in random order (the order the tokens appear in the prompt)."""
    k = rng.randint(1, num_concepts)
    return rng.sample(range(num_concepts), k)


def concept_prompt(tokens: list[str]) -> str:
    return "a photo of " + " and ".join(tokens)
