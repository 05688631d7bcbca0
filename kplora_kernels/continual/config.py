"""Configuration of the KeepLoRA++ controller, with the authors' defaults (DESIGN §1)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("keeplora++", "keeplora", "lora")


@dataclass
class KeepLoRAConfig:
    """What to adapt and how.

    ``method``: ``keeplora++`` (residual subspaces + layer scaling), ``keeplora`` (no layer
    scaling), ``lora`` (plain sequential LoRA, merged after each task: the forgetting baseline).
    ``eps_w``: energy of the pre-trained principal subspace, per tower (``"default"`` for layers
    outside a named tower). ``eps_w_out``: two-sided protection (output side) when set.
    ``targets``: regular expressions on module names (``re.search``) choosing the linears to adapt.
    ``layer_scaling_towers``: towers whose layers get ``s_l`` (the others get 1).
    ``extra_trainable``: patterns of parameters trained plainly, without protection (LLaVA's
    multimodal projector in the authors' setup); they are saved in checkpoints too.
    ``basis_dtype``: ``"fp32"`` or ``"bf16"`` storage of the bases (bf16 halves their memory and lets
    about 2e-3 of each projected update leak into the protected subspace, measured at 4096 wide).
    """

    method: str = "keeplora++"
    rank: int = 16
    alpha: float = 1.0
    eps_w: dict = field(default_factory=lambda: {"default": 0.85})
    eps_w_out: float | None = None
    eps_f: float = 0.99
    gamma: float = 0.2
    schedule: str = "linear"
    targets: list = field(default_factory=lambda: [r"\.(q_proj|k_proj|v_proj|out_proj|o_proj)$"])
    layer_scaling_towers: list = field(default_factory=lambda: ["default"])
    extra_trainable: list = field(default_factory=list)
    basis_dtype: str = "fp32"
    sketch_memory_budget: int = 64 * 2**20
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.eps_w, (int, float)):
            self.eps_w = {"default": float(self.eps_w)}
        for name, eps in [*(("eps_w[" + k + "]", v) for k, v in self.eps_w.items()), ("eps_f", self.eps_f)]:
            if not 0.0 < eps <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {eps}")
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.basis_dtype not in ("fp32", "bf16"):
            raise ValueError(f"basis_dtype must be 'fp32' or 'bf16', got {self.basis_dtype!r}")

    def eps_for(self, tower: str) -> float:
        return self.eps_w.get(tower, self.eps_w.get("default", 0.85))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KeepLoRAConfig":
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
