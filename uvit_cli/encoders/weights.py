"""Find pretrained encoder weights without surprises, by one rule for every command (docs/encoders.md):

    flag (--vae / --clip)  >  $UVIT_VAE / $UVIT_CLIP  >  the preset's `pretrained`  >  the Hugging Face cache

The first of these that is given decides; each is a file, a directory (or an SD pipeline folder with `vae/`,
`text_encoder/`) or a hub id `org/name` looked up in the cache layout (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
`~/.cache/huggingface/hub`) without network. A preset value that is a bare file name (U-ViT's
`autoencoder_kl.pth`, `autoencoder_kl_ema.pth`) names which file to take from whatever directory is used
(and is used itself only if it exists in the working directory). Only after the cache, and only if
`huggingface_hub` is installed, downloads are allowed (`HF_HUB_OFFLINE` / `UVIT_OFFLINE` unset) and
huggingface.co answers, a hub download, logged as a warning. Otherwise a `WeightsNotFoundError` lists every
place looked at and how to fix it. A given path that does not exist is an error, never a silent fallback.
The same rule for a hub id (cache, then a guarded download) serves other weights too (`find_in_hub`: U-ViT
checkpoints named `--ckpt org/name`, `uvit_cli.hub`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from uvit_cli.errors import WeightsNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightKind:
    """What to look for: file names in preference order, sub-folders of a pipeline repo, defaults."""

    name: str
    env_var: str
    flag: str
    files: tuple[str, ...]
    subfolders: tuple[str, ...]
    default_repos: tuple[str, ...]
    download_patterns: tuple[str, ...]


KINDS = {
    "vae": WeightKind(
        name="autoencoder",
        env_var="UVIT_VAE",
        flag="--vae",
        # U-ViT's own file first; the ema file must be named explicitly (huge models decode with it).
        files=(
            "autoencoder_kl.pth",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "autoencoder_kl_ema.pth",
        ),
        subfolders=("vae",),
        default_repos=("stabilityai/sd-vae-ft-ema",),
        download_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
    ),
    "clip": WeightKind(
        name="CLIP text encoder",
        env_var="UVIT_CLIP",
        flag="--clip",
        files=("model.safetensors", "pytorch_model.bin"),
        subfolders=("text_encoder",),
        default_repos=("openai/clip-vit-large-patch14",),
        download_patterns=("config.json", "model.safetensors", "vocab.json", "merges.txt", "*.json"),
    ),
    # CLIP score's network: the same file and variable as the text encoder, but only a full CLIPModel serves
    # (an SD pipeline's `text_encoder/` has no vision tower, so it is not looked into).
    "clip_model": WeightKind(
        name="CLIP model (CLIP score)",
        env_var="UVIT_CLIP",
        flag="--clip",
        files=("model.safetensors", "pytorch_model.bin"),
        subfolders=(),
        default_repos=("openai/clip-vit-large-patch14",),
        download_patterns=("config.json", "model.safetensors", "vocab.json", "merges.txt", "*.json"),
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedWeights:
    """The weights file chosen, where it came from (`argument`, `env`, `cache`, `download`) and the places looked."""

    path: Path
    source: str
    looked: list[str] = field(default_factory=list)


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, by the same rules as huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def weights_in_dir(directory: Path, kind: WeightKind, prefer: str | None = None) -> Path | None:
    """The preferred weights file (`prefer` first) in a directory or its pipeline sub-folder (`vae/`, ...)."""
    names = (prefer, *(f for f in kind.files if f != prefer)) if prefer else kind.files
    for d in (directory, *(directory / s for s in kind.subfolders)):
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def cached_snapshots(repo_id: str, cache: Path | None = None) -> list[Path]:
    """Snapshot folders of a hub repo in the local cache, the `refs/main` one first, then newest first."""
    repo_dir = (cache or hf_hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    snaps = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = repo_dir / "snapshots" / ref.read_text().strip()
        snaps = [main] + [s for s in snaps if s != main] if main.is_dir() else snaps
    return [s for s in snaps if s.is_dir()]


def _from_spec(
    spec: str, kind: WeightKind, looked: list[str], origin: str, prefer: str | None
) -> Path | None:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = weights_in_dir(path, kind, prefer)
        looked.append(f"{origin} directory {path} (no {' / '.join(kind.files)})")
        return found
    if _HUB_ID.match(spec):
        return _from_cache(spec, kind, looked, f"{origin} hub id", prefer)
    looked.append(f"{origin} {spec} (no such file or directory)")
    return None


def _from_cache(
    repo_id: str, kind: WeightKind, looked: list[str], origin: str, prefer: str | None
) -> Path | None:
    cache = hf_hub_cache()
    for snap in cached_snapshots(repo_id, cache):
        if found := weights_in_dir(snap, kind, prefer):
            return found
    looked.append(f"{origin} {repo_id} in the Hugging Face cache {cache}")
    return None


def is_hub_id(value: str) -> bool:
    """Whether `value` has the form of a hub repo id `org/name` (whether such a repo exists is not asked)."""
    return bool(_HUB_ID.match(value))


def offline() -> bool:
    """Whether downloads are switched off: `HF_HUB_OFFLINE` or `UVIT_OFFLINE` set to anything but "" or "0"."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "UVIT_OFFLINE"))


def find_in_hub(
    repo_id: str,
    kind: WeightKind,
    looked: list[str],
    *,
    prefer: str | None = None,
    allow_download: bool = True,
) -> ResolvedWeights | None:
    """A hub repo's weights file by the module's rule for hub ids: the local cache first (no network), then a
    guarded download; None when neither has it, `looked` saying where it looked and why nothing was fetched."""
    if found := _from_cache(repo_id, kind, looked, "hub id", prefer):
        return ResolvedWeights(found, "cache", looked)
    if not allow_download:
        looked.append(f"no download of {repo_id} (downloads disabled)")
    elif found := _download(repo_id, kind, looked, prefer):
        return ResolvedWeights(found, "download", looked)
    return None


def _download(repo_id: str, kind: WeightKind, looked: list[str], prefer: str | None) -> Path | None:
    """Last resort, never silent: only with huggingface_hub installed, downloads allowed and a network."""
    if offline():
        looked.append(f"no download of {repo_id} (HF_HUB_OFFLINE/UVIT_OFFLINE set)")
        return None
    try:
        import huggingface_hub
    except ImportError:
        looked.append(f"no download of {repo_id} (huggingface_hub not installed)")
        return None
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        looked.append(f"no download of {repo_id} (huggingface.co unreachable)")
        return None
    patterns = [
        *kind.download_patterns,
        *(f"{s}/{p}" for s in kind.subfolders for p in kind.download_patterns),
    ]
    log.warning("downloading %s weights from the Hugging Face hub: %s", kind.name, repo_id)
    try:
        snap = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # any hub/network failure becomes "not found", listed below
        looked.append(f"download of {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    return weights_in_dir(Path(snap), kind, prefer)


def _is_file_name(value: str) -> bool:
    """A bare weights file name (no folder part, a weights suffix): a preference, not a location."""
    return (
        "/" not in value
        and "\\" not in value
        and value.endswith((".pth", ".pt", ".ckpt", ".bin", ".safetensors"))
    )


def resolve_weights(
    spec: str | os.PathLike | None,
    kind: str,
    allow_download: bool = True,
    *,
    preset: str | None = None,
) -> ResolvedWeights:
    """Find the weights file for `kind` ("vae", "clip" or "clip_model") by the module's rule: `spec` (a command's flag),
    then the environment variable, then `preset` (the preset's `pretrained`), then the default hub repos.

    The first one given decides: one that names a missing file or directory is an error (no silent fallback
    to something else), listing every place looked at.
    """
    k = KINDS[kind]
    looked: list[str] = []
    prefer = preset if preset and _is_file_name(preset) else None
    env = os.environ.get(k.env_var) or None
    if spec is not None and str(spec) != "":
        chosen, origin, source = str(spec), "argument", "argument"
    elif env is not None:
        chosen, origin, source = env, f"${k.env_var}", "env"
    elif preset and (not prefer or Path(preset).is_file()):
        chosen, origin, source = preset, "the preset's pretrained", "preset"
    else:
        chosen, origin, source = None, "default", "cache"
        if prefer:
            looked.append(f"the preset's pretrained {preset} (not in the working directory)")
    if chosen is not None:
        if found := _from_spec(chosen, k, looked, origin, prefer):
            return ResolvedWeights(found, source, looked)
        if not (_HUB_ID.match(chosen) and not Path(chosen).expanduser().exists()):
            raise _not_found(k, looked)
        hub_ids = [chosen]
    else:
        hub_ids = list(k.default_repos)
        for repo_id in hub_ids:
            if found := _from_cache(repo_id, k, looked, origin, prefer):
                return ResolvedWeights(found, "cache", looked)
    for repo_id in hub_ids:
        if not allow_download:
            looked.append(f"no download of {repo_id} (downloads disabled)")
        elif found := _download(repo_id, k, looked, prefer):
            return ResolvedWeights(found, "download", looked)
    raise _not_found(k, looked)


def _not_found(k: WeightKind, looked: list[str]) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{k.name} weights not found; looked at: {'; '.join(looked)}. Fix: pass {k.flag} FILE|DIR|ORG/NAME, "
        f"set {k.env_var}, set the preset's pretrained, or put the files in the Hugging Face cache "
        f"(e.g. `huggingface-cli download {k.default_repos[0]}`); see docs/encoders.md"
    )
