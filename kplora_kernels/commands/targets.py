"""Which linears of a vision-language model KeepLoRA++ adapts, found from the module tree (the
layouts of transformers' families): the language model's decoder blocks, the vision tower, the
projector. ``kplora vlm`` adapts them and ``kplora memory`` counts them."""
from __future__ import annotations

import re

from torch import nn

from ..config_file import ConfigError

# module names searched for each part of a VLM, outermost first (transformers' layouts)
LANGUAGE_NAMES = ("language_model", "text_model", "llm", "text_decoder", "decoder")
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "vision")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "mm_projector", "connector", "projector", "visual_projection",
                   "aligner", "mlp1")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routing linears: not adapted


def find_named(root: nn.Module, names, skip=()) -> list[tuple[str, nn.Module]]:
    """Outermost submodules whose last name component is in ``names`` (in ``names``' order of preference)."""
    found = []
    for name, module in root.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in names and not any(name.startswith(f + ".") or name == f for f, _ in found) \
                and not any(name.startswith(s + ".") or name == s for s in skip):
            found.append((name, module))
    return sorted(found, key=lambda nm: names.index(nm[0].rpartition(".")[2]))


def find_blocks(root_name: str, root: nn.Module):
    """``(path, ModuleList)`` of the outermost list of repeated blocks holding linears under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and \
                all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            return ".".join(p for p in (root_name, name) if p), module
    return None


def _block_linears(path: str, blocks: nn.ModuleList, exclude=()) -> dict[str, int]:
    """``{module path: block index}`` of every ``nn.Linear`` inside ``blocks`` (leaf names in ``exclude`` left out)."""
    out = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in exclude:
                out[f"{path}.{i}.{name}"] = i
    return out


def discover_targets(model: nn.Module, train_vision: bool = False) -> dict:
    """What KeepLoRA++ adapts in a vision-language ``model``: ``{"language": path, "vision": path or None,
    "projector": [paths], "layer_index": {linear path: block index}, "targets": [regex]}``.

    The language model is the outermost submodule named one of :data:`LANGUAGE_NAMES`; its blocks are
    the outermost ``nn.ModuleList`` of blocks holding linears; every linear in them is a target except
    MoE routers (:data:`ROUTER_NAMES`). With ``train_vision`` the vision tower's blocks (a submodule
    named one of :data:`VISION_NAMES`) are targets too. Raises ``ConfigError`` naming what was
    searched when no language-model blocks are found (or, with ``train_vision``, no vision blocks)."""
    languages = find_named(model, LANGUAGE_NAMES)
    found = None
    for name, module in languages:
        found = find_blocks(name, module)
        if found:
            break
    if found is None:
        raise ConfigError(f"cannot find the language model's decoder layers in {type(model).__name__}: searched "
                          f"submodules named {', '.join(LANGUAGE_NAMES)} (found {[n for n, _ in languages] or 'none'}) "
                          "for an nn.ModuleList of blocks holding nn.Linear layers")
    language, blocks = found
    index = _block_linears(language, blocks, ROUTER_NAMES)
    visions = find_named(model, VISION_NAMES, skip=[n for n, _ in languages])
    vision = visions[0][0] if visions else None
    if train_vision:
        vblocks = find_blocks(*visions[0]) if visions else None
        if vblocks is None:
            raise ConfigError(f"train_vision: cannot find the vision tower's blocks in {type(model).__name__}: "
                              f"searched submodules named {', '.join(VISION_NAMES)} "
                              f"(found {[n for n, _ in visions] or 'none'})")
        index.update(_block_linears(*vblocks))
    projector = [n for n, _ in find_named(model, PROJECTOR_NAMES, skip=[language])]
    return {"language": language, "vision": vision, "projector": projector, "layer_index": index,
            "targets": ["^(" + "|".join(re.escape(n) for n in index) + ")$"]}
