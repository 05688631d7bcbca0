"""What the KeepLoRA++ state costs per layer and in total for an LLM config, and the peaks of a run
on one accelerator (the arithmetic of ``kplora memory``).

Counts, per adapted linear (q, k, v, o, gate, up, down of every decoder layer): the adapter
(``A`` r×in frozen, ``B`` out×r with its gradient and two AdamW moments), the protected
basis ``V`` (in×k_in), and the transient sketches (the task-start gradient sketch of each linear,
the task-end input sketch shared by q, k, v and by gate, up) as the library allocates them.
``k_in`` depends on the pre-trained spectrum and ``ε_w``; it is given as a fraction of ``in``.

:func:`plan` adds the model weights, activations under activation checkpointing and the logits,
and sums what is live at the three peaks — a training step, ``begin_task``, ``end_task`` — for the
``"device"`` and ``"cpu"`` basis placements (:mod:`kplora_kernels.continual.placement`), beside
plain LoRA's training step; it also sizes the controller checkpoints. Which figures are checked
against allocations and which are estimates is said at each function.

Bases in bf16 halve the basis memory but let 2e-3 of each projected update leak into the
protected subspace (measured: ``‖P(G) V‖ / ‖P(G)‖`` for a random G, 4096 wide, k = 2048; 6.6e-7
with fp32 bases), so fp32 stays the default. Past ``k_in > in/2`` the layer stores the complement
(``V_complement``), so a basis never holds more than ``in²/2`` values.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..subspace.sizing import input_sketch_width, input_strategy
from ..subspace.sketch import DEFAULT_MEMORY_BUDGET, gradient_sketch_bytes, input_sketch_bytes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def linear_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` of the adapted linears of one decoder layer: those of the built model
    (:func:`build_from_config`), or for a bare LLaMA shape dict the LLaMA layout."""
    if "linears" in cfg:
        return [tuple(t) for t in cfg["linears"]]
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg.get("num_attention_heads", 1)
    d = cfg.get("head_dim", h // heads)
    kv = d * cfg.get("num_key_value_heads", heads)
    return [("q_proj", heads * d, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, heads * d),
            ("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)]


def _widths(cfg: dict) -> tuple[int, int, int, int]:
    """``(hidden, MLP width, q width, k width)`` of one decoder layer, read from its linears."""
    shapes = {n: (o, i) for n, o, i in linear_shapes(cfg)}
    h = cfg["hidden_size"]
    q = shapes.get("q_proj", (h, h))[0]
    kv = shapes.get("k_proj", (q, h))[0]
    m = shapes["down_proj"][1] if "down_proj" in shapes else cfg["intermediate_size"]
    return h, m, q, kv


@dataclass
class LinearState:
    """Bytes of one adapted linear's KeepLoRA++ state."""

    adapter: int          # A, B and B's gradient, in the parameter dtype
    optimizer: int        # AdamW's two moments of B (torch keeps them in the parameter dtype)
    basis: int            # V or its complement, whichever is smaller, in the basis dtype
    gradient_sketch: int  # transient, at task start
    input_sketch: int     # transient, at task end (0 for k, v, up when they share q's, gate's)

    @property
    def persistent(self) -> int:
        return self.adapter + self.optimizer + self.basis


def linear_state(name: str, out: int, in_: int, rank: int, basis_fraction: float, param_bytes: int,
                 basis_bytes: int, budget: int = DEFAULT_MEMORY_BUDGET, oversample: int = 8) -> LinearState:
    k_in = min(int(round(basis_fraction * in_)), in_ - rank)
    stored = in_ - k_in if k_in > in_ / 2 else k_in  # past half the space the complement is kept
    gradient = gradient_sketch_bytes(out, in_, rank, oversample, budget)  # what GradientSketch's "auto" allocates
    if name in ("k_proj", "v_proj", "up_proj") and input_strategy(in_, budget) == "covariance":
        inputs = 0  # the exact covariance of q's (gate's) input serves k and v (up)
    else:
        inputs = input_sketch_bytes(in_, stored, budget)  # what InputSketch's "auto" allocates
    return LinearState(adapter=param_bytes * (rank * in_ + 2 * out * rank), optimizer=2 * param_bytes * out * rank,
                       basis=basis_bytes * in_ * stored, gradient_sketch=gradient, input_sketch=inputs)


def report(cfg: dict, rank: int = 32, basis_fraction: float = 0.5, param_dtype: str = "bf16",
           basis_dtype: str = "fp32", sketch_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    layers = cfg["num_hidden_layers"]
    per_linear = {name: linear_state(name, out, in_, rank, basis_fraction, DTYPE_BYTES[param_dtype],
                                     DTYPE_BYTES[basis_dtype], sketch_budget) for name, out, in_ in linear_shapes(cfg)}
    per_layer = {field: sum(getattr(s, field) for s in per_linear.values())
                 for field in ("adapter", "optimizer", "basis", "gradient_sketch", "input_sketch")}
    shapes = {name: [out, in_] for name, out, in_ in linear_shapes(cfg)}
    dense_gradients = sum(4 * o * i for o, i in shapes.values())
    return {
        "config": {**{k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
                   "rank": rank, "basis_fraction": basis_fraction, "param_dtype": param_dtype,
                   "basis_dtype": basis_dtype},
        "per_linear": {n: {**vars(s), "shape": shapes[n]} for n, s in per_linear.items()},
        "per_layer": per_layer,
        "total_persistent": layers * sum(s.persistent for s in per_linear.values()),
        "peak_transient": max(per_layer["gradient_sketch"], per_layer["input_sketch"]) * layers,
        "authors_transient": layers * dense_gradients,  # full fp32 gradients of every adapted weight
    }


def model_params(cfg: dict) -> int:
    """Parameters of the model: counted on the built model (:func:`build_from_config`: every tower,
    tied weights once), or for a bare LLaMA shape dict the embeddings, decoder layers with their two
    RMSNorms, the final norm, the LM head unless ``tie_word_embeddings``, plus ``frozen_extra_params``."""
    if "total_params" in cfg:
        return cfg["total_params"]
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg.get("vocab_size", 32000)
    linears = sum(o * i for _, o, i in linear_shapes(cfg))
    heads = 1 if cfg.get("tie_word_embeddings") is True else 2
    return heads * vocab * h + layers * (linears + 2 * h) + h + cfg.get("frozen_extra_params", 0)


def layer_saved_bytes(cfg: dict, tokens: int, rank: int, param_bytes: int, gradient_sketch: bool = False) -> int:
    """Bytes autograd saves in the forward of one LLaMA decoder layer (transformers' SDPA attention,
    frozen base weights, the seven linears wrapped as :class:`~kplora_kernels.nn.FusedKeepLoRALinear`
    with ``A`` frozen), per ``tokens`` tokens:

    - each RMSNorm saves its input upcast to fp32 and the fp32 ``rsqrt`` (``4·h + 4``), two norms;
    - attention saves ``q, k, v`` after RoPE (``q + 2·kv`` values), its output (``q``) and the fp32
      log-sum-exp per head;
    - the MLP saves ``gate``'s output (for SiLU), ``act`` and ``up`` (for the product): ``3·m``;
    - a frozen linear saves nothing per token; each fused adapter saves ``x·Aᵀ`` (``r``);
    - with ``gradient_sketch`` (the ``begin_task`` pass: a ``grad_accumulator`` on every layer) each
      adapter also saves its input ``x`` for the sketch's backward update: ``2·h + m`` (q, k, v share
      the first norm's output, gate and up the second's; ``o``'s input is the attention output SDPA
      already saves — its ``(b, s, heads, d)`` layout makes the transpose a view).

    Checked against ``saved_tensors_hooks`` on a tiny bf16 LLaMA in ``tests/test_memory.py``. This is
    also the working set one layer's recompute holds under activation checkpointing."""
    h, m, q, kv = _widths(cfg)
    heads = cfg.get("num_attention_heads", 1)
    adapters = len(linear_shapes(cfg))
    per_token = 2 * (4 * h + 4) + param_bytes * (2 * q + 2 * kv) + 4 * heads + 3 * m * param_bytes + adapters * rank * param_bytes
    if gradient_sketch:
        per_token += param_bytes * (2 * h + m)
    return tokens * per_token


def activation_bytes(cfg: dict, tokens: int, rank: int, param_bytes: int, gradient_sketch: bool = False) -> dict:
    """Activation memory of one training micro-batch of ``tokens`` tokens under activation
    checkpointing (each decoder layer a checkpoint), in bytes. ``peak`` is ``checkpoints`` plus the
    larger of ``logits`` (live at the start of the backward) and ``recompute + backward_transients``
    (later, one layer at a time): the two do not overlap in time.

    - ``checkpoints``: every layer's input hidden state, ``layers·tokens·h`` in the param dtype
      (measured: the saved bytes grow by exactly this per layer in the test);
    - ``recompute``: one layer's saved tensors while it is recomputed (:func:`layer_saved_bytes`,
      ``gradient_sketch`` as there);
    - ``backward_transients``: an estimate, not measured: the gradients in flight inside one layer's
      backward — three ``tokens×m`` (of ``act·up``, ``act``, ``up``) in the param dtype, two fp32
      ``tokens×h`` (the norms' upcast gradients) and two ``tokens×h`` hidden-state gradients;
    - ``logits``: ``tokens×vocab`` in the param dtype (the LM head's output), its fp32 upcast kept by
      the cross-entropy, and the fp32 gradient — an estimate (transformers' loss may fuse some).
    """
    h, m, _, _ = _widths(cfg)
    vocab = cfg.get("vocab_size", 32000)
    acts = {
        "checkpoints": cfg["num_hidden_layers"] * tokens * h * param_bytes,
        "recompute": layer_saved_bytes(cfg, tokens, rank, param_bytes, gradient_sketch),
        "backward_transients": tokens * (3 * m * param_bytes + 2 * 4 * h + 2 * h * param_bytes),
        "logits": tokens * vocab * (param_bytes + 4 + 4),
    }
    acts["peak"] = acts["checkpoints"] + max(acts["logits"], acts["recompute"] + acts["backward_transients"])
    return acts


def forward_bytes(cfg: dict, tokens: int, param_bytes: int) -> int:
    """A no-grad forward (the ``end_task`` input pass): one layer's largest live set — the hidden state
    and residual, ``q, k, v``, the attention output, ``gate``, ``up``, ``act`` — plus the logits in the
    param dtype. An estimate."""
    h, m, _, _ = _widths(cfg)
    return tokens * param_bytes * (6 * h + 3 * m + cfg.get("vocab_size", 32000))


def plan(cfg: dict, rank: int = 32, basis_fraction: float = 0.5, param_dtype: str = "bf16",
         basis_dtype: str = "fp32", seq_len: int = 2048, micro_batch: int = 1, tasks: int = 8,
         resident_layers: int = 2, sketch_budget: int = DEFAULT_MEMORY_BUDGET,
         device_memory: int | None = None, reserve: int = 2**30, media_tokens: int = 0) -> dict:
    """Peaks of a KeepLoRA++ run in bytes — training step, ``begin_task``, ``end_task`` — for the
    ``"device"`` and ``"cpu"`` basis placements, beside plain LoRA's training step, and the controller
    checkpoint sizes after ``tasks`` tasks.

    ``media_tokens``: the image/video tokens each sequence carries beside its ``seq_len`` text tokens (a
    video's frames after the projector or merger); the language model sees ``seq_len + media_tokens``
    tokens per sequence, the frozen vision tower runs without saving activations.

    Assumptions (each peak is the sum of what is live at once):

    - always on the device: the model weights (param dtype), the adapters (``A``, ``B``, ``B``'s
      gradient) and AdamW's moments of ``B`` (kept alive across boundaries);
    - training step: plus the activations' peak (:func:`activation_bytes`); with ``"device"`` plus all bases;
      ``"cpu"`` keeps no basis on the device (``A`` frozen, no output basis), so it equals plain LoRA
      with the same adapters (plain LoRA training ``A`` too would add ``A``'s gradient and moments);
    - ``begin_task``: the gradient pass (forward + backward under checkpointing, each layer also saving
      its inputs for the sketch) with every layer's gradient sketch resident (updated in one
      backward), then finalisation layer by layer;
    - ``end_task``: the no-grad input pass with every layer's input sketch resident, then
      finalisation one adapted linear at a time: the new basis of the linear being finalised beside
      the resident ones and an eigendecomposition workspace of two fp64 ``in×in`` (the largest exact
      covariance) or of three fp64 ``in×width`` (randomized); the sketches are counted whole
      throughout (an upper bound: each is freed once its linears are finalised);
    - ``"device"``: all bases resident throughout; ``"cpu"``: during a pass no basis (the sketches
      hold the host copies by reference), at finalisation the bases of ``resident_layers``
      consecutive adapted linears (:meth:`BasisPlacement.stream
      <kplora_kernels.continual.placement.BasisPlacement.stream>`: the current one and the
      prefetched next), the largest such window.

    A peak fits ``device_memory`` when it plus ``reserve`` does: the reserve stands for what the
    peaks do not count — the CUDA context (a few hundred MiB, outside ``max_memory_allocated``) and
    the caching allocator's fragmentation (default 1 GiB, an assumption).
    """
    pb, bb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[basis_dtype]
    r = report(cfg, rank, basis_fraction, param_dtype, basis_dtype, sketch_budget)
    layers, tokens = cfg["num_hidden_layers"], (seq_len + media_tokens) * micro_batch
    per_linear = {name: linear_state(name, out, in_, rank, basis_fraction, pb, bb, sketch_budget)
                  for name, out, in_ in linear_shapes(cfg)}
    weights = model_params(cfg) * pb
    adapters = layers * sum(s.adapter for s in per_linear.values())
    optimizer = layers * sum(s.optimizer for s in per_linear.values())
    layer_basis = sum(s.basis for s in per_linear.values())
    bases = layers * layer_basis
    grad_sketches = layers * sum(s.gradient_sketch for s in per_linear.values())
    input_sketches = layers * sum(s.input_sketch for s in per_linear.values())
    acts = activation_bytes(cfg, tokens, rank, pb)
    train_acts = acts["peak"]
    sketch_acts = activation_bytes(cfg, tokens, rank, pb, gradient_sketch=True)["peak"]  # the begin_task pass
    workspace = 0
    for _, out, in_ in linear_shapes(cfg):
        if 4 * in_ * in_ <= sketch_budget:
            workspace = max(workspace, 2 * 8 * in_ * in_)
        else:
            workspace = max(workspace, 3 * 8 * in_ * input_sketch_width(in_, sketch_budget))
    # the controller finalises the adapted linears in model order, resident_layers of them on the device
    order = [per_linear[name].basis for name, _, _ in linear_shapes(cfg)] * layers
    windows = [(sum(order[i:i + resident_layers]), order[i]) for i in range(len(order))]
    begin_window = max(w for w, _ in windows)
    end_window = max(w + new for w, new in windows)  # + the new basis of the linear being finalised
    base = weights + adapters + optimizer
    plain = base + train_acts
    # the project's "lora" method (peft's LoraLayer) trains A too: its gradient and two AdamW moments
    plain_peft = plain + layers * sum(3 * pb * rank * in_ for _, _, in_ in linear_shapes(cfg))
    peaks = {}
    for placement in ("device", "cpu"):
        resident = bases if placement == "device" else 0
        begin_final = bases if placement == "device" else begin_window
        end_final = bases + max(order) if placement == "device" else end_window
        peaks[placement] = {
            "training_step": base + resident + train_acts,
            "begin_task": base + grad_sketches + max(resident + sketch_acts, begin_final),
            "end_task": base + input_sketches + max(resident + forward_bytes(cfg, tokens, pb), end_final + workspace),
        }
        peaks[placement]["run"] = max(peaks[placement].values())
        peaks[placement]["training_vs_plain_lora"] = peaks[placement]["training_step"] / plain
        if device_memory is not None:
            peaks[placement]["fits"] = {k: peaks[placement][k] + reserve <= device_memory
                                        for k in ("training_step", "begin_task", "end_task", "run")}
    history = tasks * sum(rank * (in_ + out) * pb for _, out, in_ in linear_shapes(cfg)) * layers
    adapter_weights = layers * sum(pb * rank * (in_ + out) for _, out, in_ in linear_shapes(cfg))
    return {
        **r,
        "run": {"seq_len": seq_len, "media_tokens": media_tokens, "micro_batch": micro_batch, "tokens": tokens,
                "tasks": tasks,
                "resident_layers": resident_layers, "sketch_budget": sketch_budget,
                "vocab_size": cfg.get("vocab_size", 32000), "device_memory": device_memory, "reserve": reserve},
        "items": {"weights": weights, "adapters": adapters, "optimizer": optimizer, "bases": bases,
                  "gradient_sketches": grad_sketches, "input_sketches": input_sketches,
                  "activations": acts, "begin_task_activations": sketch_acts, "end_task_forward": forward_bytes(cfg, tokens, pb),
                  "finalise_workspace": workspace, "bases_per_layer": layer_basis,
                  "bases_at_finalise": {"begin_task": begin_window, "end_task": end_window}},
        "plain_lora_training_step": plain,
        "plain_lora_training_A_training_step": plain_peft,
        # host memory the "cpu" placement holds (pinned) for the bases; "mmap" holds them in a file instead
        "cpu_placement_host_bytes": bases,
        "vision_tower_counted": cfg.get("vision_params", 0) > 0 or "frozen_extra_params" in cfg,
        "peaks": peaks,
        "checkpoint": {"full": weights + bases + adapter_weights,
                       "compact": bases + adapter_weights + history, "task_history": history},
    }
