"""A CLIP byte-level BPE tokenizer learned from the shapes world's words.

Every world word (shapes, colours, style trigger words, a few common prompt words) becomes one
token, so prompts stay short and style triggers are real tokens that can be taught. All 256
byte characters and their end-of-word forms stay in the vocabulary, so any other word still
tokenizes, as characters. Merges are learned the BPE way (count adjacent pairs, merge the most
frequent, repeat) so their ranks are consistent; a hand-written merge chain per word would let
one word's merges break another ("green" -> g re e n).
"""

from __future__ import annotations

from collections import Counter

from .render import BACKGROUNDS, COLORS, PALETTES, SHAPES, TECHNIQUES

EXTRA_WORDS = (
    "a an the on in of with and background style picture image drawing painting photo "
    "shape small large big tiny huge left right top bottom center middle colored color "
    "light dark bright pale soft blurry ugly bad lowres"
).split()


def world_words() -> list[str]:
    words = ["a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS]
    words += [s for s in (*PALETTES, *TECHNIQUES)]
    words += EXTRA_WORDS
    return list(dict.fromkeys(words))  # ordered, unique


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every word is a single symbol. Ties break alphabetically (deterministic)."""
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        pairs = Counter()
        for s in seqs.values():
            for pair in zip(s, s[1:]):
                pairs[pair] += 1
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return merges


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = words or world_words()
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = learn_merges(words)
    tokens += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(max_length: int = 77):
    """The world's CLIPTokenizer, built in memory (saved with the base by save_pretrained)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
