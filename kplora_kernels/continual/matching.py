"""Which modules are targets: :class:`TargetMatcher`, a saved-and-compared value holding the target
spec, the exclusions and the tower rules, and the ``name → bool`` helpers built on it.

A target spec is one of:

- ``patterns``: regular expressions, each searched in the module path (``re.search``);
- ``target_modules`` with peft's meaning: a list of names, each matching a module path equal to it
  or ending in ``"." + name`` (whole name components), or one regex matched against the whole path
  (``re.fullmatch``).

``exclude_modules`` (peft's name and meaning, the same two forms as ``target_modules``) removes
modules from either spec. Tower rules ``((tower, regex), …)`` name the tower of a module path: the
first rule whose regex is found in the path (``re.search``) wins; layer depths are counted per tower.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

# open_clip's and transformers' CLIP/LLaVA towers; other paths get a tower from their block stack
# (see ``kplora_kernels.continual.targets``).
DEFAULT_TOWERS = (("visual", r"(^|\.)(visual|vision_tower|vision_model|vision_encoder|vision)\."),
                  ("text", r"^(transformer|text)\.|(^|\.)text_model\."))


def _check_regex(name: str, pattern) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{name} must hold regular expressions as str, got {type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name} holds a malformed regular expression {pattern!r}: {exc}") from None


def _patterns(patterns) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise TypeError(f"patterns must be a list of regular expressions, got the str {patterns!r}; "
                        f"write [{patterns!r}]")
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(f"patterns must be a list of regular expressions, got {type(patterns).__name__}")
    for p in patterns:
        _check_regex("patterns", p)
    return tuple(patterns)


def _peft_names(argument: str, spec) -> "str | tuple[str, ...]":
    """peft's two forms, normalised: a regex str as is, a collection of names as a sorted tuple."""
    if isinstance(spec, str):
        if spec == "all-linear":
            raise ValueError(f"{argument}='all-linear' (peft's shorthand) is not supported: list the module "
                             "names, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']")
        _check_regex(argument, spec)
        return spec
    if not isinstance(spec, (list, tuple, set, frozenset)):
        raise TypeError(f"{argument} must be a str (regex) or a list of module names, got {type(spec).__name__}")
    for t in spec:
        if not isinstance(t, str) or not t:
            raise TypeError(f"{argument} must hold non-empty str module names, got {t!r}")
    return tuple(sorted(set(spec)))


def _towers(towers) -> tuple[tuple[str, str], ...]:
    if isinstance(towers, (str, dict)) or not isinstance(towers, (list, tuple)):
        raise TypeError(f"towers must be a list of (tower name, regex) pairs, got {type(towers).__name__} {towers!r}")
    out = []
    for rule in towers:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str) or not rule[0]:
            raise TypeError(f"towers must hold (tower name, regex) pairs with a non-empty name, got {rule!r}")
        _check_regex("towers", rule[1])
        out.append((rule[0], rule[1]))
    return tuple(out)


def _peft_test(spec) -> Callable[[str], bool]:
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    names = frozenset(spec)
    return lambda name: name in names or any(name.endswith("." + t) for t in names)


@dataclass(frozen=True, repr=False)
class TargetMatcher:
    """The target spec of a model as one value: which module paths are targets, which are excluded,
    and the tower rules. Exactly one of ``patterns`` and ``target_modules`` is given.

    Args:
        patterns: regular expressions (list or tuple of str), each searched in the module path.
        target_modules: peft's ``LoraConfig.target_modules``: names (list, tuple or set; a path
            equal to one or ending in ``"." + name``) or one regex str (``re.fullmatch``).
            peft's ``"all-linear"`` is refused (list the names).
        exclude_modules: peft's ``LoraConfig.exclude_modules``, the same two forms; an excluded path
            is never a target, whichever spec matched it.
        towers: ``((tower, regex), …)``, first match (``re.search``) wins; default
            :data:`DEFAULT_TOWERS` (``visual``, ``text``).

    Equal specs compare equal: name collections are kept sorted and deduplicated (their order and
    repeats do not change what matches), patterns and tower rules in their order (it is their
    meaning). :meth:`to_dict`/:meth:`from_dict` round-trip through JSON-able lists.

    Raises:
        ValueError: neither or both of ``patterns`` and ``target_modules``, a malformed regex, or
            ``"all-linear"``.
        TypeError: a spec of the wrong type (a bare str for ``patterns``, a non-str name, …).
    """

    patterns: "tuple[str, ...] | None" = None
    target_modules: "str | tuple[str, ...] | None" = None
    exclude_modules: "str | tuple[str, ...] | None" = None
    towers: "tuple[tuple[str, str], ...]" = DEFAULT_TOWERS
    _test: Callable = field(init=False, compare=False, hash=False)
    _excluded: Callable = field(init=False, compare=False, hash=False)
    _tower_rules: tuple = field(init=False, compare=False, hash=False)

    def __post_init__(self):
        if (self.patterns is None) == (self.target_modules is None):
            raise ValueError("give exactly one of patterns (regexes, re.search) and target_modules (peft-style), "
                             f"got patterns={self.patterns!r}, target_modules={self.target_modules!r}")
        put = object.__setattr__  # frozen: normalised values are set once, here
        if self.patterns is not None:
            put(self, "patterns", _patterns(self.patterns))
            compiled = [re.compile(p) for p in self.patterns]
            put(self, "_test", lambda name: any(p.search(name) for p in compiled))
        else:
            put(self, "target_modules", _peft_names("target_modules", self.target_modules))
            put(self, "_test", _peft_test(self.target_modules))
        if self.exclude_modules is not None:
            put(self, "exclude_modules", _peft_names("exclude_modules", self.exclude_modules))
            put(self, "_excluded", _peft_test(self.exclude_modules))
        else:
            put(self, "_excluded", lambda name: False)
        put(self, "towers", _towers(self.towers))
        put(self, "_tower_rules", tuple((t, re.compile(p)) for t, p in self.towers))

    def __repr__(self) -> str:
        def show(v):
            return repr(list(v)) if isinstance(v, tuple) else repr(v)

        parts = [f"patterns={show(self.patterns)}" if self.patterns is not None
                 else f"target_modules={show(self.target_modules)}"]
        if self.exclude_modules is not None:
            parts.append(f"exclude_modules={show(self.exclude_modules)}")
        if self.towers != DEFAULT_TOWERS:
            parts.append(f"towers={[list(r) for r in self.towers]!r}")
        return f"TargetMatcher({', '.join(parts)})"

    @property
    def uses_target_modules(self) -> bool:
        """True for a peft-style ``target_modules`` spec (a matched non-linear is refused, as peft does)."""
        return self.target_modules is not None

    def matches_name(self, name: str) -> bool:
        """Does the module path ``name`` match the spec and escape ``exclude_modules``? (The module
        itself is not looked at: :meth:`match` does.)"""
        return self._test(name) and not self._excluded(name)

    def match(self, name: str, module: nn.Module) -> bool:
        """Is the module at path ``name`` a target: its path matches (:meth:`matches_name`) and it is
        an ``nn.Linear``? A matching non-linear is passed over for ``patterns`` (a regex may well
        match a parent module) and refused for ``target_modules`` (peft refuses it too).

        Raises:
            ValueError: ``target_modules`` matches a module that is not an ``nn.Linear`` (already
                wrapped adapters excepted); for an attention the message names its projections.
            NotImplementedError: the module is a transformers ``Conv1D`` (GPT-2's ``c_attn``,
                ``c_proj``, ``c_fc``: weight stored in×out); only ``nn.Linear`` is wrapped.
        """
        if not self.matches_name(name):
            return False
        if isinstance(module, nn.Linear):
            return True
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            raise NotImplementedError(
                f"target {name!r} is a transformers Conv1D (GPT-2 style, weight stored in×out): "
                "FusedKeepLoRALinear wraps nn.Linear (weight out×in) only; convert the Conv1D layers to "
                "nn.Linear (weight = conv.weight.T) or leave them out of the targets")
        from ..nn import FusedKeepLoRALinear
        from .surgery import SplitMultiheadAttention  # here: surgery imports this module

        if self.uses_target_modules and not isinstance(module, FusedKeepLoRALinear):
            hint = (f"; name its projections ({name}.q_proj, …, {name}.out_proj)"
                    if isinstance(module, (nn.MultiheadAttention, SplitMultiheadAttention)) else "")
            raise ValueError(f"target_modules matches {name!r}, a {type(module).__name__}: only nn.Linear "
                             f"modules can be adapted{hint}")
        return False

    def tower(self, name: str) -> "str | None":
        """The tower named by the first rule found in ``name``, or None when no rule matches."""
        for tower, pattern in self._tower_rules:
            if pattern.search(name):
                return tower
        return None

    def spec_text(self) -> str:
        """The spec as a user wrote it, for messages: ``patterns [...]`` or ``target_modules [...]``."""
        if self.patterns is not None:
            return f"patterns {list(self.patterns)!r}"
        tm = self.target_modules
        return f"target_modules {list(tm) if isinstance(tm, tuple) else tm!r}"

    def to_dict(self) -> dict:
        """A JSON-able dict (lists, str, None) that :meth:`from_dict` turns back into an equal matcher."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {"patterns": plain(self.patterns), "target_modules": plain(self.target_modules),
                "exclude_modules": plain(self.exclude_modules), "towers": [list(r) for r in self.towers]}

    @classmethod
    def from_dict(cls, data: dict) -> "TargetMatcher":
        """The matcher :meth:`to_dict` wrote. Raises ``TypeError`` for a non-dict and ``ValueError``
        for unknown keys (a missing ``towers`` or ``exclude_modules`` takes its default)."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict (TargetMatcher.to_dict()), got {type(data).__name__}")
        known = ("patterns", "target_modules", "exclude_modules", "towers")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown TargetMatcher keys {unknown}; known keys: {list(known)}")
        kw = dict(data)
        for key in ("patterns", "target_modules", "exclude_modules"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        if "towers" in kw:
            kw["towers"] = tuple(tuple(r) if isinstance(r, list) else r for r in kw["towers"])
        return cls(**kw)


# --- name → bool, for callers that hold one spec argument -------------------------------------------

def regex_matcher(patterns) -> Callable[[str], bool]:
    """``name → bool``: does one of ``patterns`` (a list or tuple of regular expressions) occur in the
    module path (``re.search``)? A bare string is refused (it would be read character by character)."""
    return TargetMatcher(patterns=patterns).matches_name


def peft_matcher(target_modules) -> Callable[[str], bool]:
    """``name → bool`` with peft's meaning of ``LoraConfig.target_modules``: a str is a regular
    expression matched against the whole module path (``re.fullmatch``); a list (or set) of names
    matches a path equal to one of them or ending in ``"." + name``, so ``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj`` but not ``…self_attn.xq_proj``. peft's ``"all-linear"``
    shorthand is expanded by peft against the model's head; it is refused here (list the names)."""
    return TargetMatcher(target_modules=target_modules).matches_name


def target_matcher(patterns=None, target_modules=None) -> Callable[[str], bool]:
    """The ``name → bool`` test of a target spec: exactly one of ``patterns`` (list of regexes,
    ``re.search``) and ``target_modules`` (peft's meaning, see :func:`peft_matcher`) must be given."""
    return TargetMatcher(patterns=patterns, target_modules=target_modules).matches_name


def as_matcher(patterns=None, target_modules=None, exclude_modules=None, matcher=None) -> TargetMatcher:
    """One :class:`TargetMatcher` from either a ready ``matcher`` or the spec keywords (not both)."""
    if matcher is None:
        return TargetMatcher(patterns=patterns, target_modules=target_modules, exclude_modules=exclude_modules)
    if not isinstance(matcher, TargetMatcher):
        raise TypeError(f"matcher must be a TargetMatcher, got {type(matcher).__name__}")
    if (patterns, target_modules, exclude_modules) != (None, None, None):
        raise ValueError("give either matcher or patterns/target_modules/exclude_modules, not both: got "
                         f"matcher={matcher!r} and patterns={patterns!r}, target_modules={target_modules!r}, "
                         f"exclude_modules={exclude_modules!r}")
    return matcher
