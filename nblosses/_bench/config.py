"""Benchmark configuration: peers and performance targets, read from a JSON data file.

The default is ``targets.json`` next to this module; ``nblosses bench --targets FILE`` reads
another file of the same form (its ``_doc`` entry describes every field). JSON rather than
TOML because :mod:`tomllib` needs Python 3.11 and nblosses supports 3.10.

Like :mod:`.cases`, this module uses no relative imports: asv loads it from the working tree.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_FILE", "KINDS", "load"]

DEFAULT_FILE = Path(__file__).with_name("targets.json")

#: Target kinds and the keys each one needs besides ``kind``, ``name`` and ``goal``.
KINDS: dict[str, tuple[str, ...]] = {
    "ratio": ("peer", "stat", "ops"),
    "pct_copy": ("stat", "min_bytes", "ops"),
    "memory": ("ops",),
    "first_call": ("ops",),
    "relative": ("peer", "pairs"),
}
_TOP_KEYS = ("peers", "tolerance", "memory_ops", "first_call_ops", "targets")


class ConfigError(ValueError):
    """The benchmark configuration file is malformed."""


def _check_target(i: int, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ConfigError(f"targets[{i}] is not an object")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"targets[{i}]: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    missing = [k for k in ("name", "goal", *KINDS[kind]) if k not in spec]
    if missing:
        raise ConfigError(f"targets[{i}] ({kind}) lacks {', '.join(missing)}")
    if spec.get("cmp", ">=") not in (">=", "<="):
        raise ConfigError(f"targets[{i}]: cmp must be '>=' or '<='")
    if spec.get("stat", "min") not in ("min", "geomean"):
        raise ConfigError(f"targets[{i}]: stat must be 'min' or 'geomean'")


def validate(cfg: Any) -> dict[str, Any]:
    """``cfg`` itself when it has every section and each target is well formed."""
    if not isinstance(cfg, dict):
        raise ConfigError("the configuration must be a JSON object")
    missing = [k for k in _TOP_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"configuration lacks {', '.join(missing)}")
    for name, peer in cfg["peers"].items():
        if not {"module", "backends", "ops"} <= set(peer):
            raise ConfigError(f"peer {name!r} needs module, backends and ops")
    for i, spec in enumerate(cfg["targets"]):
        _check_target(i, spec)
    return cfg


@functools.lru_cache(maxsize=8)
def _load_file(path: str) -> str:
    return Path(path).read_text()


def load(path: str | Path | None = None) -> dict[str, Any]:
    """The configuration in ``path`` (default: :data:`DEFAULT_FILE`), validated.

    Raises
    ------
    ConfigError
        When the file is not valid JSON or misses a section.
    OSError
        When it cannot be read.
    """
    path = str(path or DEFAULT_FILE)
    try:
        cfg = json.loads(_load_file(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return validate(cfg)
