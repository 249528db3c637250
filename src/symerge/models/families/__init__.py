"""Model families as plugins: each one a `Family` (see `base`) registered with `@register_family`.

A family owns its `model:` config section (the config's `model` is the union of the registered sections,
discriminated by `family`), loads a pool from it, reads its data files, writes a result and loads it back. Adding a
family is one module here plus its import below (see docs/architecture.md, "How to add a model family").
"""

from symerge.models.families.base import (ExportInfo, Family, LoadedModel, ModelSection, family_names,
                                          forward_families, get_family, model_section_type, register_family,
                                          task_model_families)

# Importing the family modules registers them (in this order: it is the order error messages list them in).
from symerge.models.families import hf_text, clip, state_dict, hf_image  # noqa: E402,F401  isort: skip

__all__ = [
    "ExportInfo", "Family", "LoadedModel", "ModelSection", "family_names", "forward_families", "get_family",
    "model_section_type", "register_family", "task_model_families",
]
