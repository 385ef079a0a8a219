"""CLIP BPE tokenizer, pure Python, giving the ids U-ViT stored (transformers 4.23.1 slow CLIPTokenizer + ftfy).

Pipeline (docs/encoders.md): split out the special tokens, then per piece ftfy.fix_text, collapse whitespace,
strip, lower; the CLIP regex; byte-level BPE with a `</w>` end-of-word marker; BOS + at most 75 tokens + EOS,
padded with EOS (49407) to 77. There is deliberately no `html.unescape` (OpenAI's SimpleTokenizer has one,
the tokenizer U-ViT used does not).

The vocabulary ships with the package: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, see
`bpe_simple_vocab_16e6.LICENSE.txt`). A Hugging Face `vocab.json` + `merges.txt` directory gives the same table.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from uvit_cli.errors import CheckpointError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407  # also the pad and unknown token of openai/clip-vit-large-patch14
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # = 48894: the merges OpenAI's vocabulary uses; the .gz holds a few more lines
BUNDLED_BPE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

# The CLIP pre-tokenisation pattern (needs the `regex` module for \p{L} / \p{N}).
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character, the GPT-2/CLIP table (printable bytes map to themselves)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):  # the rest are moved above 255, in byte order
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@functools.cache
def _merges_from_gz(path: Path) -> list[tuple[str, str]]:
    """The first 48894 merges of OpenAI's table (parsed once per process; callers must not mutate it)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # type: ignore[misc]


def _vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's construction: 256 byte chars, the same with `</w>`, one entry per merge, then the 2 specials."""
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {w: i for i, w in enumerate(words)}


@functools.cache
def _bundled_vocab() -> dict[str, int]:
    return _vocab_from_merges(_merges_from_gz(BUNDLED_BPE))


@dataclass(frozen=True)
class TokenBatch:
    """Token ids (B, 77) int64 and, per text, whether it was cut to fit."""

    input_ids: torch.Tensor
    truncated: list[bool]


class CLIPTokenizer:
    """Same ids as U-ViT's `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")` (slow, with ftfy)."""

    def __init__(
        self,
        encoder: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        if merges is None:
            merges = _merges_from_gz(BUNDLED_BPE)
        if encoder is None:
            encoder = (
                _bundled_vocab() if merges is _merges_from_gz(BUNDLED_BPE) else _vocab_from_merges(merges)
            )
        self.encoder = encoder
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.bos_id = encoder[BOS_TOKEN]
        self.eos_id = encoder[EOS_TOKEN]
        self.pad_id = self.eos_id
        self.unk_id = self.eos_id
        # Specials resolve through the cache, as in the reference (they never reach the merge loop).
        self._cache: dict[str, str] = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}
        import regex  # deferred: keeps `import uvit_cli.encoders` cheap

        self._pat = regex.compile(_PATTERN, regex.IGNORECASE)
        self._ws = regex.compile(r"\s+")

    @classmethod
    def from_directory(cls, path: str | Path) -> CLIPTokenizer:
        """Load a Hugging Face tokenizer directory (`vocab.json` + `merges.txt`)."""
        path = Path(path)
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        if not (vocab_file.is_file() and merges_file.is_file()):
            raise CheckpointError(f"{path} has no vocab.json + merges.txt tokenizer files")
        encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").strip().split("\n")
        # As the reference: skip the "#version" line and keep the first 48894 merges.
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        return cls(encoder, merges)  # type: ignore[arg-type]

    # --- text -> BPE tokens -------------------------------------------------------------------------------
    def _clean(self, text: str) -> str:
        import ftfy  # deferred import (cheap package import)

        return self._ws.sub(" ", ftfy.fix_text(text)).strip().lower()

    def bpe(self, token: str) -> str:
        """Merge the characters of one pre-token by merge rank; returns space-separated BPE symbols."""
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of `best`, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[token] = out
        return out

    def _encode_piece(self, text: str) -> list[int]:
        ids: list[int] = []
        for tok in self._pat.findall(self._clean(text)):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder.get(sym, self.unk_id) for sym in self.bpe(tok).split(" "))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without BOS/EOS and without truncation."""
        ids: list[int] = []
        # Like the reference, special tokens written in the text are split out before cleaning, case-sensitively.
        pieces = [text]
        for special in (BOS_TOKEN, EOS_TOKEN):
            pieces = [q for p in pieces for q in _split_keep(p, special)]
        for piece in pieces:
            if piece in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.encoder[piece])
            else:
                ids.extend(self._encode_piece(piece))
        return ids

    # --- batch -> (B, 77) --------------------------------------------------------------------------------
    def __call__(self, texts: list[str] | str) -> TokenBatch:
        """BOS + ids (cut to context_length - 2) + EOS, padded with EOS to context_length."""
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        rows, truncated = [], []
        for text in texts:
            ids = self.encode(text)
            truncated.append(len(ids) > n - 2)
            ids = [self.bos_id, *ids[: n - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        out = torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)  # (B, context_length)
        return TokenBatch(out, truncated)


def _split_keep(text: str, sep: str) -> list[str]:
    """'a<s>b' -> ['a', '<s>', 'b'], dropping empty pieces."""
    parts = text.split(sep)
    out: list[str] = []
    for i, part in enumerate(parts):
        if i:
            out.append(sep)
        if part:
            out.append(part)
    return out
