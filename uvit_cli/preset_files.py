"""Preset files: where they are found, reading and validating them, `--set key=value` overrides, and the
one-line error a bad value gets (naming the file or the `--set` that put it there).

Imports no torch; `config` re-exports every public name. `Preset` is imported where it is used, as
`config` imports this module.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from uvit_cli.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from uvit_cli.config import Preset

PRESETS_ENV = "UVIT_PRESETS"


def presets_dir() -> Path:
    """The packaged presets: $UVIT_PRESETS, else `presets/` of the checkout (editable install), else
    <prefix>/share/uvit/presets (where a regular `pip install` puts them)."""
    env = os.environ.get(PRESETS_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "presets"
    installed = Path(sys.prefix) / "share" / "uvit" / "presets"
    return installed if not checkout.is_dir() and installed.is_dir() else checkout


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def resolve_preset_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A path to a TOML file, or the name of a packaged preset (with or without `.toml`)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    candidate = presets_dir() / f"{p.stem if p.suffix == '.toml' else p.name}.toml"
    if candidate.exists():
        return candidate
    if p.suffix == ".toml":
        raise ConfigError(f"{p}: preset file not found")
    names = list_presets()
    hint = _did_you_mean(str(name_or_path), names)
    known = ", ".join(names) or "none"
    raise ConfigError(
        f"unknown preset '{name_or_path}'{hint} (known: {known}; or pass a path to a .toml file)"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); the value is parsed as a TOML value, else a string."""
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line (decoded as surrogates)
        raise ConfigError(f"--set {_shown(item)!r}: not UTF-8 text") from None
    if "=" not in item:
        raise ConfigError(f"--set {_shown(item)!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    path = [k.strip() for k in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {_shown(item)!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError(f"--set {_shown(item)!r}: {_TOO_DEEP}") from None
    return path, value


# tomllib, json and pydantic recurse once per level of nesting; a preset nests two levels deep.
_TOO_DEEP = "lists or tables nested too deeply to be a preset value (a preset nests two levels at most)"


def _shown(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters for an error line."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for k in path[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {_shown(item)!r}: '{k}' is not a table")
            node = nxt
        node[path[-1]] = value
    return data


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at `loc[:-1]` of a preset (its table's fields), for suggestions."""
    from uvit_cli.config import Preset

    cls: Any = Preset
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        cls = field.annotation if field is not None else None
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _format_validation_error(source: str, err: ValidationError, overrides: Sequence[str] = ()) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(str(first["loc"][-1]), _known_keys(first["loc"]))
    for item in overrides:  # blame the --set that put the bad value there, not the file
        path = ".".join(parse_override(item)[0])
        if loc == path or loc.startswith(path + ".") or path.startswith(loc + "."):
            source = f"--set {_shown(item)}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def preset_from_dict(data: dict[str, Any], source: str = "preset", overrides: Sequence[str] = ()) -> Preset:
    from uvit_cli.config import Preset

    try:
        return Preset.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err, overrides)) from None
    except RecursionError:
        raise ConfigError(f"{source}: {_TOO_DEEP}") from None


def load_preset(name_or_path: str | os.PathLike[str], overrides: list[str] | None = None) -> Preset:
    """Load and validate a preset; `overrides` are `key.path=value` strings applied on top."""
    path = resolve_preset_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML text file (it is not UTF-8 text)") from None
    data = _toml_table(text, str(path))
    data.setdefault("name", path.stem)
    apply_overrides(data, overrides or [])
    return preset_from_dict(data, str(path), overrides or [])


def preset_from_toml(text: str, source: str = "embedded preset") -> Preset:
    return preset_from_dict(_toml_table(text, source), source)


def _toml_table(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{source}: {_TOO_DEEP}") from None
