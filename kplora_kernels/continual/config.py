"""Configuration of the KeepLoRA++ controller, with the authors' defaults (DESIGN §1)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config_file import setting
from ..schedules import SCHEDULES
from .methods import FULL_METHODS, REGISTRY, check_config  # noqa: F401  (FULL_METHODS: re-exported)
from .values import EPS_RANGE, at_least, eps, number

METHODS = tuple(REGISTRY)  # keeplora++, keeplora, lora, lora-fa, inflora, olora
ADAPTERS = ("lora", "full")
BASIS_DTYPES = ("fp32", "bf16")
RESIDUAL_ENERGY = ("auto", "exact", "estimate")
MAX_SKETCH_PASSES = 64


def _patterns(name: str, value) -> list:
    """A list of valid regular expressions (a lone string is refused: it would be read per character)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of regular expressions, got {type(value).__name__} {value!r}"
                        + (f" (write [{value!r}])" if isinstance(value, str) else ""))
    for i, p in enumerate(value):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str (a regular expression), got {type(p).__name__} {p!r}")
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{name}[{i}] = {p!r} is not a valid regular expression: {exc}") from None
    return list(value)


def _names(name: str, value) -> list:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of str, got {type(value).__name__} {value!r}")
    return list(value)


@dataclass
class KeepLoRAConfig:
    """What to adapt and how.

    ``method``: ``keeplora++`` (residual subspaces + layer scaling), ``keeplora`` (no layer
    scaling), ``lora`` (plain sequential LoRA as peft's, merged after each task: the forgetting
    baseline), ``lora-fa`` (frozen random ``A``), ``inflora`` (Liang & Li, CVPR 2024), ``olora``
    (Wang et al., EMNLP Findings 2023; ``olora_lambda1``, ``olora_lambda2`` weigh its loss), see
    :mod:`kplora_kernels.continual.methods`.
    ``adapter``: ``"lora"`` (low-rank adapters) or ``"full"`` (the target weights themselves train,
    every update confined to the residual subspace; for ``keeplora++``, ``keeplora``, and ``lora``
    = plain sequential fine-tuning), see :mod:`kplora_kernels.continual.adapter_modes`.
    ``eps_w``: energy of the pre-trained principal subspace, per tower (``"default"`` for layers
    outside a named tower). ``eps_w_out``: two-sided protection (output side) when set.
    ``targets``: regular expressions on module names (``re.search``) choosing the linears to adapt.
    ``target_modules``: the same choice with peft's meaning (``LoraConfig.target_modules``): a list of
    module-name suffixes (``"q_proj"`` matches ``…self_attn.q_proj``) or one regular expression that
    must match the whole module path; None (default) uses ``targets``. Giving both ``target_modules``
    and a non-default ``targets`` is refused. ``exclude_modules``: peft's ``LoraConfig.exclude_modules``
    (the same two forms): an excluded path is never a target, whichever spec matched it.
    ``dropout``: the adapters' input dropout probability in [0, 1) (peft's ``lora_dropout``).
    ``layer_scaling_towers``: towers whose layers get ``s_l`` (the others get 1).
    ``extra_trainable``: patterns of parameters trained plainly, without protection (LLaVA's
    multimodal projector in the authors' setup); they are saved in checkpoints too.
    ``basis_dtype``: ``"fp32"`` or ``"bf16"`` storage of the bases (bf16 halves their memory and lets
    about 2e-3 of each projected update leak into the protected subspace, measured at 4096 wide).
    ``residual_energy``: how a randomized input sketch (inputs too wide for the exact covariance within
    ``sketch_memory_budget``) gets the GPM rule's residual energy — ``"auto"`` (exact while the stored
    basis has at most the sketch's width, the XNysTrace estimate beyond), ``"exact"`` (always; one
    more product per batch as wide as the stored basis, and that basis on the device during the
    pass) or ``"estimate"``; see :class:`~kplora_kernels.subspace.InputSketch`.
    ``max_sketch_passes``: at a task end, the most data passes (1 to 64) that grow the input bases:
    a randomized input sketch appends at most its width (``sketch_memory_budget / (4·in)`` columns)
    per pass, so a task needing more new directions takes further passes over the residual; a layer
    still short of ``eps_f`` after this many is logged as a warning (see ``KeepLoRA.end_task``).
    """

    method: str = setting("keeplora++", "the continual-learning method", choices=METHODS)
    rank: int = setting(16, "adapter rank r", ge=1)
    alpha: float = setting(1.0, "adapter scale α (the update is α/r·s·BA)", gt=0)
    eps_w: dict = setting(default_factory=lambda: {"default": 0.85},
                          help="ε_w of the principal subspaces, per tower", **EPS_RANGE)
    eps_w_out: float | None = setting(None, "ε_w of the output side (two-sided protection; null: none)", **EPS_RANGE)
    eps_f: float = setting(0.99, "ε_f of the task-feature (GPM) expansion", **EPS_RANGE)
    gamma: float = setting(0.2, "γ, the first block's layer scale", **EPS_RANGE)
    schedule: str = setting("linear", "layer-scale schedule over a tower's depth", choices=SCHEDULES)
    targets: list = setting(default_factory=lambda: [r"\.(q_proj|k_proj|v_proj|out_proj|o_proj)$"],
                            help="regular expressions (re.search) on module paths")
    layer_scaling_towers: list = setting(default_factory=lambda: ["default"], help="towers whose layers get s_l")
    extra_trainable: list = setting(default_factory=list, help="patterns of parameters trained plainly")
    basis_dtype: str = setting("fp32", "dtype the protected bases are kept in", choices=BASIS_DTYPES)
    sketch_memory_budget: int = setting(64 * 2**20, "bytes one layer's input or gradient sketch may take", ge=1)
    seed: int = setting(0, "seed of the sketches' test matrices and adapter fills")
    adapter: str = setting("lora", "low-rank adapters or the target weights themselves", choices=ADAPTERS)
    olora_lambda1: float = setting(0.5, "O-LoRA's orthogonality weight", ge=0)
    olora_lambda2: float = setting(0.0, "O-LoRA's L2 weight", ge=0)
    target_modules: list | str | None = setting(None, "peft's target_modules (names or one regex)")
    exclude_modules: list | str | None = setting(None, "peft's exclude_modules (names or one regex)")
    dropout: float = setting(0.0, "the adapters' input dropout probability", ge=0, lt=1)
    residual_energy: str = setting("auto", "how a randomized input sketch gets the residual energy",
                                   choices=RESIDUAL_ENERGY)
    max_sketch_passes: int = setting(8, "most data passes growing the input bases at a task end", ge=1,
                                     le=MAX_SKETCH_PASSES)

    def __post_init__(self):
        """Validate every field (types and ranges); raises ``TypeError``/``ValueError`` naming it."""
        for name, allowed in (("method", METHODS), ("adapter", ADAPTERS), ("basis_dtype", BASIS_DTYPES),
                              ("schedule", SCHEDULES), ("residual_energy", RESIDUAL_ENERGY)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
        if isinstance(self.eps_w, bool) or not isinstance(self.eps_w, (int, float, dict)):
            raise TypeError(f"eps_w must be a number or a dict {{tower: number}}, got {type(self.eps_w).__name__} "
                            f"{self.eps_w!r}")
        if not isinstance(self.eps_w, dict):
            self.eps_w = {"default": self.eps_w}
        self.eps_w = {k: eps(f"eps_w[{k!r}]", v) for k, v in self.eps_w.items()}
        if not all(isinstance(k, str) for k in self.eps_w):
            raise TypeError(f"eps_w keys must be tower names (str), got {list(self.eps_w)}")
        self.eps_f = eps("eps_f", self.eps_f)
        for name in ("rank", "sketch_memory_budget"):
            at_least(name, getattr(self, name), 1, integer=True)
        number("seed", self.seed, integer=True)
        if not 1 <= number("max_sketch_passes", self.max_sketch_passes, integer=True) <= MAX_SKETCH_PASSES:
            raise ValueError(f"max_sketch_passes must be in [1, {MAX_SKETCH_PASSES}], got {self.max_sketch_passes}")
        self.alpha = number("alpha", self.alpha)
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        self.gamma = eps("gamma", self.gamma)  # a fraction in (0, 1], as an energy threshold
        check_config(self, {f.name: f.default for f in dataclasses.fields(self)})  # the methods' own options
        self.targets = _patterns("targets", self.targets)
        if self.target_modules is not None:
            from .adapters import peft_matcher

            if self.targets != KeepLoRAConfig.__dataclass_fields__["targets"].default_factory():
                raise ValueError(f"give either targets (regexes) or target_modules (peft-style), not both: got "
                                 f"targets={self.targets!r} and target_modules={self.target_modules!r}")
            if isinstance(self.target_modules, (set, frozenset)):
                self.target_modules = sorted(self.target_modules)
            peft_matcher(self.target_modules)  # raises TypeError/ValueError for a bad spec
            if isinstance(self.target_modules, tuple):
                self.target_modules = list(self.target_modules)
            if isinstance(self.target_modules, list) and not self.target_modules:
                raise ValueError("target_modules must name at least one module, got []")
        if self.exclude_modules is not None:
            from .matching import _peft_names

            names = _peft_names("exclude_modules", self.exclude_modules)  # raises naming the field
            if not isinstance(self.exclude_modules, (str, list)):  # a set or tuple: sorted, as a list
                self.exclude_modules = list(names)
        self.dropout = number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets must name at least one pattern, got []")
        self.extra_trainable = _patterns("extra_trainable", self.extra_trainable)
        self.layer_scaling_towers = _names("layer_scaling_towers", self.layer_scaling_towers)

    @property
    def target_spec(self) -> dict:
        """The keyword arguments of :func:`~kplora_kernels.continual.adapters.find_targets` and
        :func:`~kplora_kernels.continual.adapters.split_multihead_attention` for this config."""
        spec = {"target_modules": self.target_modules} if self.target_modules is not None else {"patterns": self.targets}
        if self.exclude_modules is not None:
            spec["exclude_modules"] = self.exclude_modules
        return spec

    @property
    def target_matcher(self):
        """The :class:`~kplora_kernels.continual.matching.TargetMatcher` of :attr:`target_spec` (a value:
        printed, saved in checkpoints and compared on load)."""
        from .matching import TargetMatcher

        return TargetMatcher(**self.target_spec)

    @classmethod
    def from_peft(cls, lora_config, **overrides) -> "KeepLoRAConfig":
        """A config from a ``peft.LoraConfig``: ``r`` → ``rank``, ``lora_alpha`` → ``alpha`` (the same
        factor ``alpha/r`` on ``B A``), ``lora_dropout`` → ``dropout``, ``target_modules`` →
        ``target_modules`` and ``exclude_modules`` (peft's meaning); ``overrides`` set any other field (``method``, ``eps_w``, …).

        Raises:
            TypeError: ``lora_config`` is not a ``peft.LoraConfig``.
            ValueError: ``target_modules`` is unset (peft would pick per-architecture defaults: list
                them), or an option this engine cannot honour differs from peft's default (``use_dora``,
                ``use_rslora``, ``bias``, ``init_lora_weights``, ``layers_to_transform``,
                ``modules_to_save``, ``rank_pattern``, ``alpha_pattern``,
                ``fan_in_fan_out``, ``layer_replication``, …); the message names the option.
        """
        try:
            from peft import LoraConfig
        except ImportError as exc:  # pragma: no cover - peft is a test dependency
            raise ImportError("KeepLoRAConfig.from_peft needs peft (pip install peft)") from exc
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
        mapped = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                  "exclude_modules": "exclude_modules"}
        harmless = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode", "runtime_config", "layers_pattern"}  # layers_pattern acts only with layers_to_transform
        default = LoraConfig()
        for f in dataclasses.fields(LoraConfig):
            if f.name in mapped or f.name in harmless:
                continue
            ours, theirs = getattr(lora_config, f.name, None), getattr(default, f.name, None)
            if ours != theirs:
                raise ValueError(f"LoraConfig.{f.name}={ours!r} cannot be honoured by KeepLoRA (only peft's default "
                                 f"{theirs!r} is supported); the mapped options are {sorted(mapped)}")
        if lora_config.target_modules is None:
            raise ValueError("LoraConfig.target_modules is None (peft would choose per-architecture defaults); "
                             "list the modules, e.g. target_modules=['q_proj', 'v_proj']")
        target_modules = lora_config.target_modules
        if isinstance(target_modules, (set, frozenset)):
            target_modules = sorted(target_modules)
        exclude_modules = getattr(lora_config, "exclude_modules", None)
        if isinstance(exclude_modules, (set, frozenset)):
            exclude_modules = sorted(exclude_modules)
        fields = {"rank": lora_config.r, "alpha": lora_config.lora_alpha, "dropout": lora_config.lora_dropout,
                  "target_modules": target_modules, "exclude_modules": exclude_modules}
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys in overrides: {unknown}")
        return cls(**{**fields, **overrides})

    @classmethod
    def setting(cls, name: str, default=dataclasses.MISSING, help: str | None = None, **kwargs):
        """The field ``name`` of this config as a command's setting (:func:`~kplora_kernels.config_file.setting`):
        its help, range and choices, with the command's own ``default`` (and ``help``) where given,
        so a command embeds the library's declaration instead of restating it."""
        spec = {f.name: f for f in dataclasses.fields(cls)}
        if name not in spec:
            raise ValueError(f"name: expected a KeepLoRAConfig field, got {name!r}; fields: {sorted(spec)}")
        meta = {k: v for k, v in spec[name].metadata.items() if k != "help"}
        if default is dataclasses.MISSING and "default_factory" not in kwargs:
            default = spec[name].default
        return setting(default, spec[name].metadata["help"] if help is None else help, **{**meta, **kwargs})

    def eps_for(self, tower: str) -> float:
        """``ε_w`` of ``tower``: its own entry of ``eps_w``, else ``eps_w["default"]``; raises
        ``ValueError`` naming the tower and the keys when ``eps_w`` has neither."""
        if tower in self.eps_w:
            return self.eps_w[tower]
        if "default" in self.eps_w:
            return self.eps_w["default"]
        raise ValueError(f"eps_w: no entry for the tower {tower!r} and no 'default' (keys: {sorted(self.eps_w)}); "
                         f"add {tower!r} or 'default'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KeepLoRAConfig":
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def preset(name: str, **overrides) -> KeepLoRAConfig:
    """The authors' settings: ``"clip"`` (ViT-B/16: q, k, v, out of both towers, r = 16, α = 1,
    ε_w 0.85 vision / 0.2 text, ε_f 0.99, layer scaling on the vision tower) or ``"llava"``
    (LLaVA-1.5-7B: q, k, v, o, gate, up, down of every LLM layer, r = 32, α = r/4, ε_w 0.6)."""
    if name == "clip":
        base = dict(rank=16, alpha=1.0, eps_w={"visual": 0.85, "text": 0.2, "default": 0.85}, eps_f=0.99,
                    targets=[r"\.attn\.(q_proj|k_proj|v_proj|out_proj)$"], layer_scaling_towers=["visual"])
    elif name == "llava":
        base = dict(rank=32, alpha=8.0, eps_w={"default": 0.6}, eps_f=0.99,
                    targets=[r"language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"],
                    layer_scaling_towers=["default"], extra_trainable=[r"multi_modal_projector\."])
    else:
        raise ValueError(f"unknown preset {name!r}; presets: 'clip', 'llava'")
    base.update(overrides)
    return KeepLoRAConfig(**base)
