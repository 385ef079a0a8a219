"""A toy text encoder: CLIP's text architecture, tiny, with frozen seeded weights and a word vocabulary.

It stands in for CLIP ViT-L/14 so that the shapes pipeline runs without downloads. It has never been
trained: its features separate the words of the toy captions (random embeddings of a small vocabulary
are nearly orthogonal), and the diffusion model learns to read them, as U-ViT learns to read CLIP's.
It knows only the words of `VOCABULARY`; it is not a language model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from uvit_cli.errors import DataError
from uvit_cli.shapes.render import COLOURS, POSITIONS, SHAPES, SIZES

if TYPE_CHECKING:
    from uvit_cli.encoders.clip import CLIPTextEncoder
    from uvit_cli.encoders.tokenizer import TokenBatch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_FILLER = ("a", "an", "the", "at", "in", "on")
# Every word a toy caption uses, in a fixed order (ids are positions in this tuple).
VOCABULARY: tuple[str, ...] = (
    BOS,
    EOS,
    *_FILLER,
    *COLOURS,
    *SHAPES,
    *sorted({w for p in POSITIONS for w in p.split()}),
    *SIZES,
)
CONTEXT_LENGTH = 12  # BOS + at most 10 words + EOS; the longest toy caption has 8 words
WIDTH = 64
LAYERS = 2
HEADS = 4
SEED = 0


class WordTokenizer:
    """Lower-case words -> ids, CLIP style: [BOS, words..., EOS] padded with EOS to `context_length`."""

    def __init__(
        self, vocabulary: tuple[str, ...] = VOCABULARY, context_length: int = CONTEXT_LENGTH
    ) -> None:
        self.vocabulary = vocabulary
        self.ids = {w: i for i, w in enumerate(vocabulary)}
        self.context_length = context_length

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def encode(self, text: str) -> list[int]:
        words = self.words(text)
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            known = ", ".join(w for w in self.vocabulary if not w.startswith("<|"))
            raise DataError(f"the toy text encoder does not know {', '.join(unknown)!s} (it knows: {known})")
        if len(words) + 2 > self.context_length:
            raise DataError(f"{text!r}: longer than {self.context_length - 2} words")
        ids = [self.ids[BOS], *(self.ids[w] for w in words), self.ids[EOS]]
        return ids + [self.ids[EOS]] * (self.context_length - len(ids))

    def __call__(self, texts: list[str] | str) -> TokenBatch:
        """The same contract as `CLIPTokenizer`: `.input_ids` (B, context_length) int64."""
        import torch

        from uvit_cli.encoders.tokenizer import TokenBatch

        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.tensor([self.encode(t) for t in texts], dtype=torch.long)  # (B, context_length)
        return TokenBatch(ids, [False] * len(texts))


def toy_text_encoder(seed: int = SEED) -> CLIPTextEncoder:
    """The frozen toy encoder: `CLIPTextEncoder` with a 64-wide, 2-layer tower, initialised from `seed`.

    `.encode(texts)` -> (B, 12, 64) float32, the shapes set's context (what CLIP's (B, 77, 768) is for COCO).
    """
    import torch

    from uvit_cli.encoders.clip import CLIPTextConfig, CLIPTextEncoder

    tokenizer = WordTokenizer()
    cfg = CLIPTextConfig(
        vocab_size=len(VOCABULARY),
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=CONTEXT_LENGTH,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        model = CLIPTextEncoder(cfg)
    model.tokenizer = tokenizer  # type: ignore[assignment]  # same contract: texts -> TokenBatch
    model.eval().requires_grad_(False)
    model.weights_path = f"toy:seed={seed}"
    model.weights_sha256 = weights_digest(model)
    return model


def weights_digest(model: CLIPTextEncoder) -> str:
    """sha256 of the encoder's tensors: recorded in the manifest, checked again at sampling."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
