"""A CLIP tokenizer generated in code, for the random-weight presets.

The presets must run with no files fetched, and a CLIP tokenizer needs a byte-level BPE
vocabulary and merge list. We build one: the 256 byte symbols (alone and as word ends),
then merges that make a fixed list of common prompt words single tokens. Any other word
still tokenizes, byte by byte. The result is deterministic, so a preset tokenizer is the
same on every machine and bundles made with it stay loadable.
"""
from __future__ import annotations

from functools import lru_cache

from transformers import CLIPTokenizer

# Words used by prompts, prompt templates and common initializer words.
_COMMON_WORDS = (
    "a an and at of the in on with photo picture image of by near under "
    "beach snow forest city street table grass water park kitchen desert mountain "
    "bear cat dog chicken bird toy toys creature person man woman child car ball cup "
    "bottle chair vase flower plant book box hat bag shoe tree house animal object thing "
    "red blue green white black small big sitting standing"
).split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_vocab_and_merges(words: tuple[str, ...] = _COMMON_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    seen_merges: set[str] = set()
    for word in sorted(set(words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            pair = f"{current} {sym}"
            current = current + sym
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append((current[: len(current) - len(sym)], sym))
                tokens.append(current)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_preset_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
