import random
from collections import Counter

from breakscene.method.union_sampling import concept_prompt, sample_subset, token_names


def test_union_sampling_draws_every_non_empty_subset():
    rng = random.Random(0)
    draws = [tuple(sample_subset(rng, 3)) for _ in range(3000)]
    assert all(1 <= len(d) <= 3 and len(set(d)) == len(d) for d in draws)
    subsets = Counter(frozenset(d) for d in draws)
    assert len(subsets) == 7  # 2^3 - 1
    sizes = Counter(len(d) for d in draws)
    # subset size is uniform over 1..3 (as in the authors' code)
    assert all(abs(sizes[k] / 3000 - 1 / 3) < 0.04 for k in (1, 2, 3))
    # order inside a drawn subset varies (it is the order in the prompt)
    assert len({d for d in draws if set(d) == {0, 1}}) == 2


def test_union_sampling_is_seeded():
    a = [sample_subset(random.Random(7), 4) for _ in range(5)]
    b = [sample_subset(random.Random(7), 4) for _ in range(5)]
    assert a == b


def test_prompt_text():
    assert token_names(2) == ["<asset0>", "<asset1>"]
    assert concept_prompt(["<asset1>", "<asset0>"]) == "a photo of <asset1> and <asset0>"
