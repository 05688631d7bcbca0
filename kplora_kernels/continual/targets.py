"""The adapted linears of a model and their depths: :func:`find_targets`, :class:`Target`,
:func:`layer_report`.

KeepLoRA++ scales the adapter of block ``l`` of ``L`` in a tower by ``s_l`` (docs/design.md,
"Layer scaling"), so every target needs its block index within its tower and the tower's block
count. Both are read from the model's structure, not from its module paths: a target's *block
stack* is the outermost container on its path, below the root, that is an ``nn.ModuleList`` or
``nn.Sequential`` whose children are all named by position and all of one class (GPT-2's
``transformer.h``, LLaMA's ``model.layers``, CLIP's ``resblocks``, T5's ``encoder.block`` — not
T5's ``block.N.layer``, a list of different sublayers inside one block). The index is the
target's position in its stack, the depth the stack's length.

Towers: a tower rule of the matcher (``visual``, ``text`` by default) names a target's tower when
it matches its path; the other targets form the tower ``"default"`` when they sit in one block
stack, and one tower per stack otherwise, named by the stack's parent path (T5: ``encoder`` and
``decoder``). A tower whose targets sit in two stacks is refused (their depths cannot be
compared), and so are several unnamed stacks when one lies inside a list (the stages of one tower
built from differing stage classes, or towers?): pass ``layer_index`` or tower rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn import FusedKeepLoRALinear
from ..schedules import layer_scales
from .matching import TargetMatcher, as_matcher
from .surgery import _fused_path_readers


@dataclass(frozen=True)
class Target:
    """An adapted linear: its module path ``name``, its ``tower``, its block ``index`` within the
    tower (0 = shallowest), the tower's block count ``depth`` (``L`` of the layer scale), and the
    ``stack`` (module path of the block container) the index was read from; ``stack`` is ``""``
    when the index came from ``layer_index``."""

    name: str
    tower: str
    index: int
    depth: int
    stack: str


def _is_stack(module: nn.Module) -> bool:
    """A container of repeated blocks: ``nn.ModuleList``/``nn.Sequential``, children named by
    position, all of one class."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    children = list(module.named_children())
    return all(n.isdigit() for n, _ in children) and len({type(c) for _, c in children}) == 1


def _stack_of(model: nn.Module, name: str, cache: dict) -> "tuple[str, int, int] | None":
    """``(stack path, position, stack length)`` of the outermost block stack on the path ``name``
    below the root, or None."""
    parts = name.split(".")
    module = model
    for i, part in enumerate(parts):
        if i > 0:
            key = id(module)
            if key not in cache:
                cache[key] = _is_stack(module)
            if cache[key] and part.isdigit():
                return ".".join(parts[:i]), list(module._modules).index(part), len(module)
        module = module._modules[part]
    return None


def _check_layer_index(layer_index) -> dict:
    if layer_index is None:
        return {}
    if not isinstance(layer_index, dict):
        raise TypeError(f"layer_index must be a dict {{module path: index}}, got {type(layer_index).__name__}")
    for name, index in layer_index.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"layer_index[{name!r}] must be an int ≥ 0 (the block index within its tower), "
                             f"got {index!r}")
    return layer_index


def _candidates(model: nn.Module, matcher: TargetMatcher) -> list[str]:
    """The paths of the linears ``matcher`` takes, after the refusals of adapters that would never
    run or would change other modules."""
    readers = _fused_path_readers(model)
    owners: dict[int, list[str]] = {}  # parameter → every module path holding it (tied weights)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    spec = ({"patterns": list(matcher.patterns)} if matcher.patterns is not None
            else {"target_modules": matcher.target_modules})
    names = []
    for name, module in model.named_modules():
        if not matcher.match(name, module):
            continue
        tied = [o for o in owners.get(id(module.weight), []) if o != name]
        if tied:
            raise ValueError(f"target {name!r} shares its weight with {tied} (tied weights): merging its adapter "
                             "would change them too; leave it out of the targets")
        if name in readers:
            raise ValueError(f"target {name!r} is {readers[name]}, so an adapter there would never run. Split "
                             f"the attention first: split_multihead_attention(model, **{spec!r})")
        names.append(name)
    if not names:
        wrapped = [n for n, m in model.named_modules() if isinstance(m, FusedKeepLoRALinear)]
        if wrapped:
            raise ValueError(f"the model is already wrapped (FusedKeepLoRALinear at {wrapped[:3]}): wrap a freshly "
                             "built model, or keep using the controller that wrapped it")
        linears = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        how = ("targets are regular expressions searched in the module path (the default needs a '.' before "
               "the name: r'\\.(q_proj|v_proj)$'); target_modules=['q_proj', ...] matches name suffixes as peft does"
               if matcher.patterns is not None
               else "target_modules are module-name suffixes or one full-path regular expression")
        raise ValueError(f"no nn.Linear matches the target {matcher.spec_text()}"
                         f"{'' if matcher.exclude_modules is None else f' less exclude_modules {matcher.exclude_modules!r}'}"
                         f"; the model's nn.Linear modules: {linears[:8]}{' …' if len(linears) > 8 else ''} ({how})")
    return names


def find_targets(model: nn.Module, patterns=None, layer_index: dict | None = None, *, target_modules=None,
                 exclude_modules=None, matcher: TargetMatcher | None = None) -> list[Target]:
    """Every ``nn.Linear`` of ``model`` that the target spec takes, with its tower, block index and
    tower depth (see the module docstring), in ``model.named_modules()`` order.

    Args:
        patterns, target_modules, exclude_modules: the target spec (see
            :class:`~kplora_kernels.continual.matching.TargetMatcher`), or
        matcher: a ready ``TargetMatcher`` (then none of the three).
        layer_index: ``{module path: block index}`` overriding the structure for the targets it
            names (their tower depth is at least ``index + 1``).

    Raises:
        ValueError: nothing matches; a target sits in no block stack and is not in ``layer_index``
            ("cannot find the layer index"); a tower's targets sit in two block stacks; a target
            shares its weight with another module (tied); a target is read by ``.weight`` instead
            of called, so that an adapter there would never run (an ``out_proj`` inside an
            ``nn.MultiheadAttention`` that is still packed, or ``linear1``/``linear2`` of an
            ``nn.TransformerEncoderLayer`` whose attention is): split it first with
            :func:`~kplora_kernels.continual.surgery.split_multihead_attention` given the same spec;
            ``target_modules`` matches a non-linear.
        TypeError: ``layer_index`` is not a dict, or a spec of the wrong type.
        NotImplementedError: a target is a transformers ``Conv1D`` (GPT-2).
    """
    matcher = as_matcher(patterns, target_modules, exclude_modules, matcher)
    layer_index = _check_layer_index(layer_index)
    names = _candidates(model, matcher)
    cache: dict = {}
    found = {}  # name → (rule tower or None, (stack, position, length) or None)
    for name in names:
        found[name] = (matcher.tower(name), _stack_of(model, name, cache))
        if found[name][1] is None and name not in layer_index:
            raise ValueError(f"cannot find the layer index of target {name!r}: no nn.ModuleList/nn.Sequential of "
                             "same-class blocks (below the model's root) holds it, so its depth in its tower is "
                             f"unknown; pass it in layer_index={{{name!r}: index}} or leave it out of the targets")
    unnamed = sorted({s[0] for name, (tower, s) in found.items()
                      if tower is None and s is not None and name not in layer_index})
    nested = [s for s in unnamed if any(p.isdigit() for p in s.split("."))]
    if len(unnamed) > 1 and nested:  # stacks inside positions of a list: stages of one tower, not towers
        raise ValueError(f"the targets sit in {len(unnamed)} block stacks {unnamed}, some inside a list of "
                         f"differing modules ({nested}): one tower or several? Pass layer_index={{module path: "
                         "block index} for these targets, or tower rules that name each tower "
                         "(TargetMatcher(towers=...))")
    parents = {s: s.rpartition(".")[0] for s in unnamed}
    if len(set(parents.values())) < len(unnamed) or not all(parents.values()):
        parents = {s: s for s in unnamed}
    stack_tower = {s: "default" for s in unnamed} if len(unnamed) == 1 else parents
    towers = {}
    for name, (tower, stack) in found.items():
        towers[name] = tower or (stack_tower.get(stack[0], "default") if stack is not None else "default")
    depths: dict[str, int] = {}
    stacks: dict[str, dict[str, int]] = {}  # tower → {stack path: length} of its structurally indexed targets
    for name, (_, stack) in found.items():
        tower = towers[name]
        if name in layer_index:
            depths[tower] = max(depths.get(tower, 0), layer_index[name] + 1)
        else:
            stacks.setdefault(tower, {})[stack[0]] = stack[2]
            depths[tower] = max(depths.get(tower, 0), stack[2])
    for tower, held in stacks.items():
        if len(held) > 1:
            listed = ", ".join(f"{s!r} ({n} blocks)" for s, n in held.items())
            raise ValueError(f"the targets of tower {tower!r} sit in {len(held)} block stacks, {listed}: their depths "
                             "cannot be compared. Pass layer_index={module path: block index} for these targets, or "
                             "tower rules that put each stack in a tower of its own (TargetMatcher(towers=...))")
    targets = []
    for name, (_, stack) in found.items():
        if name in layer_index:
            targets.append(Target(name, towers[name], layer_index[name], depths[towers[name]], ""))
        else:
            targets.append(Target(name, towers[name], stack[1], depths[towers[name]], stack[0]))
    return targets


def layer_scale(target: Target, gamma: float = 0.2, schedule: str = "linear") -> float:
    """The layer scale ``s_l`` of ``target``: ``layer_scales(target.depth, gamma, schedule)[target.index]``
    (see :func:`kplora_kernels.schedules.layer_scales`; errors as there)."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    return layer_scales(target.depth, gamma, schedule)[target.index]


def layer_report(targets, *, schedule: "str | None" = None, gamma: float = 0.2, towers=None) -> str:
    """A table, one row per target: ``target  tower  index  depth`` and, with a ``schedule``, the
    ``scale`` of :func:`layer_scale` (1.0 for targets outside ``towers``; ``towers=None`` scales
    every tower). A line per tower follows: its block stacks and target count; a tower in
    ``towers`` that holds no target is named (its scaling would do nothing).

    Raises ``TypeError`` when ``targets`` holds anything but :class:`Target` or ``towers`` is a str,
    and ``ValueError`` for an empty ``targets`` (and from :func:`layer_scale`)."""
    targets = list(targets)
    if not targets:
        raise ValueError("targets must hold at least one Target (find_targets(...)), got none")
    bad = [t for t in targets if not isinstance(t, Target)]
    if bad:
        raise TypeError(f"targets must hold Target values (find_targets(...)), got a {type(bad[0]).__name__}")
    if isinstance(towers, str):
        raise TypeError(f"towers must be a list of tower names, got the str {towers!r}; write [{towers!r}]")
    header = ["target", "tower", "index", "depth"] + (["scale"] if schedule is not None else [])
    rows = []
    for t in targets:
        row = [t.name, t.tower, str(t.index), str(t.depth)]
        if schedule is not None:
            scaled = towers is None or t.tower in towers
            row.append(f"{layer_scale(t, gamma, schedule):.4f}" if scaled else "1.0000 (not scaled)")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    summary: dict[str, dict] = {}
    for t in targets:
        entry = summary.setdefault(t.tower, {"stacks": set(), "count": 0, "depth": t.depth})
        entry["stacks"].add(t.stack or "layer_index")
        entry["count"] += 1
    for tower, entry in summary.items():
        lines.append(f"tower {tower!r}: {entry['depth']} blocks ({', '.join(sorted(entry['stacks']))}), "
                     f"{entry['count']} targets")
    if schedule is not None:
        lines.insert(0, f"layer scales: schedule {schedule!r}, gamma {gamma}, towers "
                        f"{'all' if towers is None else list(towers)}")
        missing = [t for t in (towers or ()) if t not in summary]
        if missing:
            lines.append(f"note: scaled towers {missing} hold no target (the targets' towers: {sorted(summary)})")
    return "\n".join(lines)
