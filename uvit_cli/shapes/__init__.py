"""Captioned shapes: the procedural text-to-image set that lets the whole pipeline learn on a CPU.

    prepare_shapes("feats/shapes")               # pixels + toy-CLIP contexts in the shard format
    encoder = toy_text_encoder()                 # CLIP text architecture, frozen seeded weights
    fidelity(images, prompts)                    # weight-free colour / shape accuracy

Modules: `render` (scenes, Pillow drawing, captions), `text` (word tokenizer, toy encoder),
`analyze` (the fidelity score), `prepare` (the shard writer). See docs/quickstart.md.
"""

from __future__ import annotations

from uvit_cli.lazy import lazy_exports

__all__ = ["fidelity", "prepare_shapes", "read_image", "toy_text_encoder"]

_LAZY = {
    "fidelity": "analyze",
    "read_image": "analyze",
    "prepare_shapes": "prepare",
    "toy_text_encoder": "text",
}


__getattr__ = lazy_exports(__name__, _LAZY)
