"""CLIP tokenizer: the ids U-ViT stored (transformers 4.23.1 slow CLIPTokenizer + ftfy), on tricky captions."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from encoder_fixtures import write_tokenizer_files

from uvit_cli.encoders import CLIPTokenizer
from uvit_cli.encoders.tokenizer import BUNDLED_BPE, bytes_to_unicode

TRICKY = [
    "A green train is coming down the tracks.",
    "A group of skiers are preparing to ski down a mountain.",
    "A small kitchen with low a ceiling",
    "",
    "   ",
    "two\nlines\tand\u00a0nbsp and zero\u200bwidth",
    "It's a dog's life, isn't it? They're, we've, I'm, you'll, he'd",
    "Crème brûlée at the café in São Paulo, naïve façade",
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot;",
    "<b>Tom &amp; Jerry</b>",
    "mojibake: cafÃ© and donâ€™t",
    "“Curly quotes” and ‘single’ — dashes – too…",
    "ＦＵＬＬ－ＷＩＤＴＨ ｔｅｘｔ and the ﬁne ligature",
    "emoji 🐶🐱👍🏽 and flags 🇯🇵",
    "東京タワーの夜景 and 한국어 and 中文字符",
    "numbers 1234567 and 3.14 and 1,000",
    "a photo <|endoftext|> with the end token in the text",
    "<|startoftext|>starts with the start token",
    "UPPER lower MiXeD",
    " ".join(["word"] * 80),  # > 77 tokens
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_vendored_vocabulary_is_openais(tok):
    assert hashlib.md5(BUNDLED_BPE.read_bytes()).hexdigest() == "933b7abbbbde62c36f02f0e6ccde464f"
    assert BUNDLED_BPE.with_name("bpe_simple_vocab_16e6.LICENSE.txt").read_text().startswith("MIT License")
    assert len(tok.encoder) == 49408 and len(tok.bpe_ranks) == 48894
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407


def test_golden_ids_derived_by_hand(tok):
    # Single characters are byte-table ids: printable bytes from "!" (33) map to themselves in order,
    # so a char c is id ord(c) - 33 and c + "</w>" is 256 + ord(c) - 33.
    table = list(bytes_to_unicode().values())
    assert table[: ord("~") - 32] == [chr(c) for c in range(33, 127)]
    assert tok.encode("a") == [256 + ord("a") - 33] == [320]
    assert tok.encode(".") == [269] and tok.encode("&") == [261]
    # Whole words in OpenAI's vocabulary (the ids printed in countless SD prompt-debugging threads).
    ids = tok(["a photo of a cat"]).input_ids[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 49407).all() and ids.shape == (77,)
    inv = {v: k for k, v in tok.encoder.items()}
    words = [inv[i] for i in tok.encode("A green train is coming down the tracks.")]
    assert words == [
        "a</w>",
        "green</w>",
        "train</w>",
        "is</w>",
        "coming</w>",
        "down</w>",
        "the</w>",
        "tracks</w>",
        ".</w>",
    ]
    assert tok.encode("Tom &amp; Jerry") == tok.encode("tom & jerry")  # ftfy unescapes a lone entity
    assert tok.encode("it's") == [tok.encoder["it</w>"], tok.encoder["'s</w>"]]


def test_empty_and_truncation(tok):
    empty = tok([""])
    assert empty.input_ids[0].tolist() == [49406] + [49407] * 76 and empty.truncated == [False]
    batch = tok(["a " * 75, "a " * 76])
    assert batch.truncated == [False, True]
    for row in batch.input_ids:
        assert row[0] == 49406 and (row[1:76] == 320).all() and row[76] == 49407  # EOS kept after cutting


def test_end_token_in_text_is_the_special_id(tok):
    ids = tok.encode("a photo <|endoftext|> x")
    assert ids == [320, 1125, 49407, 343]


def test_hf_directory_gives_the_same_table(tok, tmp_path):
    d = write_tokenizer_files(tmp_path)
    assert (d / "merges.txt").read_text().splitlines()[-1] == "jeky ll</w>"
    other = CLIPTokenizer.from_directory(d)
    assert other.encoder == tok.encoder
    assert torch.equal(other(TRICKY).input_ids, tok(TRICKY).input_ids)


def test_matches_reference_on_tricky_captions(tok, tmp_path):
    """Reference: transformers 5 CLIPTokenizer on ftfy-cleaned, whitespace-collapsed text (docs/encoders.md §4
    measured this equal to transformers 4.23.1 slow + ftfy, the tokenizer U-ViT used, on 32/32 captions)."""
    transformers = pytest.importorskip("transformers")
    import ftfy

    d = write_tokenizer_files(tmp_path)
    ref = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cleaned = [re.sub(r"\s+", " ", ftfy.fix_text(t)).strip() for t in TRICKY]
    want = ref(cleaned, truncation=True, max_length=77, padding="max_length", return_tensors="pt")[
        "input_ids"
    ]
    got = tok(TRICKY).input_ids
    bad = [t for t, a, b in zip(TRICKY, got, want, strict=True) if not torch.equal(a, b)]
    assert not bad, bad
    # The cleaning matters: without ftfy the fast tokenizer differs on entities, mojibake and full-width text.
    raw = ref(TRICKY, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    assert sum(not torch.equal(a, b) for a, b in zip(got, raw, strict=True)) >= 3


# Ids from U-ViT's tokenizer itself: transformers 4.23.1 slow CLIPTokenizer with ftfy 6.3.1, called as
# libs/clip.py does (truncation, max_length 77, padding "max_length"), on the vocab.json/merges.txt that
# write_tokenizer_files derives from the bundled .gz. Listed up to the final EOS; the rest is 49407 padding.
# (In the audit run, 3,036 captions, 3,000 of them seeded random mixes of these pieces, gave identical ids.)
OFFICIAL_IDS = {
    "<b>Tom &amp; Jerry</b>": [49406, 283, 321, 285, 2435, 261, 6259, 282, 9164, 34308, 321, 285, 49407],
    "a<|endoftext|>b <|ENDOFTEXT|>": [49406, 320, 49407, 321, 49407, 49407],  # lower-cased special too
    "\uff46\uff55\uff4c\uff4c\uff0d\uff57\uff49\uff44\uff54\uff48 \ufb01 ligature": [
        49406, 1476, 268, 23571, 3589, 19915, 4490, 49407,
    ],
    "\u00c3\u00a9t\u00c3\u00a9 don\u2019t": [49406, 3459, 39694, 847, 713, 49407],
    "\u63a7\u5236\u0000char\u0007s": [49406, 162, 236, 100, 42748, 114, 540, 864, 49407],
    "emoji \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1ef\U0001f1f5": [
        49406, 16327, 26304, 26304, 964, 356, 26527, 49407,
    ],
    "&lt;3 &#39;q&#39; &quot;x&quot;": [49406, 283, 274, 262, 336, 262, 257, 343, 257, 49407],
    "Mr. O'Neil's": [49406, 1982, 269, 334, 262, 8030, 568, 49407],
    "": [49406, 49407],
}  # fmt: skip


def test_ids_from_the_official_tokenizer(tok):
    texts = list(OFFICIAL_IDS)
    got = tok(texts).input_ids
    for text, row in zip(texts, got, strict=True):
        want = OFFICIAL_IDS[text]
        assert row.tolist() == want + [49407] * (77 - len(want)), text
    long = tok(["x" * 500]).input_ids[0]  # official: BOS, 75 x "xxxxxxxx"-pieces (32035), EOS at 76
    assert long[0] == 49406 and (long[1:76] == 32035).all() and long[76] == 49407
