"""The Hugging Face Hub: a Hub reference (`org/name`, `hf://org/name[/file]`) resolved to a local file
(`resolve_hub`), which is how `--ckpt` and `--init` take one (`checkpoint.find_checkpoint`), and the upload
of an exported folder (`push`; the folder itself is `export.export`'s).

A Hub reference is looked up by the encoders' rule (`encoders.weights.find_in_hub`): the Hugging Face cache
first (no network; `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`), then, unless
`HF_HUB_OFFLINE` / `UVIT_OFFLINE` is set, a download with `huggingface_hub`, logged as a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from uvit_cli.checkpoint import EMA_FILE, MODEL_FILE, PRESET_FILE
from uvit_cli.encoders.weights import WeightKind, find_in_hub, hf_hub_cache, is_hub_id, offline
from uvit_cli.errors import CheckpointError, ConfigError, UvitError
from uvit_cli.fileio import write_text_atomic

CARD_FILE = "README.md"  # an exported folder's model card
REPO_PLACEHOLDER = "ORG/NAME"  # in the card until `push` names the repo
_CKPT_FILES = (EMA_FILE, MODEL_FILE, "nnet_ema.pth", "nnet.pth")  # what `org/name` looks for, in order


class HubError(UvitError):
    """The Hub refused or failed an upload (network, permissions, a repo id it does not accept)."""

    exit_code = 2


# --------------------------------------------------------------------------------------------------
# Hub references


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub: its repo id and, for `hf://org/name/file`, the file in it."""

    repo_id: str
    file: str | None
    text: str  # as the user wrote it

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.file}" if self.file else self.repo_id


def hub_ref(value: str | os.PathLike[str]) -> HubRef | None:
    """The Hub reference `value` names, or None for a local path. `hf://org/name[/file]` always names the
    Hub (also as `hf:/...`, which a path argument folds it into); `org/name` only where no such local path
    exists: a file or directory of that name always wins."""
    text = os.fspath(value)
    if text.startswith("hf:/"):
        parts = text[len("hf:/") :].lstrip("/").split("/")
        repo_id, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
        if len(parts) < 2 or not is_hub_id(repo_id) or any(p in ("", ".", "..") for p in parts[2:]):
            raise CheckpointError(
                f"{text}: not a Hub reference; expected hf://ORG/NAME or hf://ORG/NAME/FILE"
            )
        return HubRef(repo_id, file, text)
    if is_hub_id(text) and not Path(text).expanduser().exists():
        return HubRef(text, None, text)
    return None


def resolve_hub(ref: HubRef, *, ema: bool = True) -> Path:
    """The local weights file of a Hub model: its file in the Hugging Face cache (offline), else downloaded
    (with `preset.toml` beside it) unless downloads are off. `org/name` takes ema.safetensors,
    model.safetensors (an exported folder), nnet_ema.pth or nnet.pth, in that order (model.safetensors
    first when not `ema`). A miss is one CheckpointError naming the places looked at and the fix."""
    files = (ref.file,) if ref.file else _CKPT_FILES
    kind = WeightKind(
        name=f"U-ViT checkpoint {ref}",
        env_var="",
        flag="--ckpt",
        files=files,
        subfolders=(),
        default_repos=(ref.repo_id,),
        download_patterns=(*files, PRESET_FILE),
    )
    prefer = None if ref.file or ema else MODEL_FILE
    looked: list[str] = []
    found = find_in_hub(ref.repo_id, kind, looked, prefer=prefer)
    if found is not None:
        return found.path
    local = "" if ref.text.startswith("hf:") else "no such local file or directory, and "
    online = ", unset HF_HUB_OFFLINE/UVIT_OFFLINE to let uvit download it" if offline() else ""
    raise CheckpointError(
        f"{ref.text}: {local}no Hub model {ref} found; looked at: {'; '.join(looked)}. Fix: "
        f"`huggingface-cli download {ref.repo_id}` (it then loads offline from {hf_hub_cache()}){online}, "
        "or pass a local file or run dir"
    )


# --------------------------------------------------------------------------------------------------
# Push


def push(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hub model repo `repo_id` (created if missing); its URL.

    The card's ORG/NAME placeholder becomes `repo_id` first. Without huggingface_hub or a token: one line."""
    folder = Path(folder)
    missing = [n for n in (MODEL_FILE, PRESET_FILE, CARD_FILE) if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"{folder}: not an exported folder (no {', '.join(missing)}); make one with "
                          "`uvit export RUN --out DIR`")  # fmt: skip
    if not is_hub_id(repo_id):
        raise ConfigError(f"{repo_id}: not a Hub repo id; expected ORG/NAME (e.g. your-name/cifar10-uvit-s2)")
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError('uploading needs huggingface_hub: pip install "uvit[hub]"') from None
    token = huggingface_hub.get_token()
    if not token:
        raise ConfigError(
            "no Hugging Face token: run `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN"
        )
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    if REPO_PLACEHOLDER in card:
        write_text_atomic(folder / CARD_FILE, card.replace(REPO_PLACEHOLDER, repo_id))
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload U-ViT with uvit export")  # fmt: skip
    except Exception as e:  # network, permissions, a name the Hub refuses: one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise HubError(f"upload of {folder} to {repo_id} failed ({type(e).__name__}: {first})") from None
    return str(url) if url else f"https://huggingface.co/{repo_id}"
