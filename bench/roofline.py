"""Rooflines of the GPU benchmarks: bytes moved and FLOPs per call of the Triton ops, and the
HBM-bound time limit they give on a GPU (a single device run then reads as a verdict: the percentage
of the limit reached).

HBM peaks (TB/s, vendor figures): H200 4.8, H100 SXM 3.35, A100-80GB 2.0, RTX 4090 1.0. Bytes are
the minimum HBM traffic of one call (every operand read once, every output written once: second
sweeps that hit L2 are not counted), so ``limit_s = bytes / peak`` is a lower bound on the time.
"""
from __future__ import annotations

HBM_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "4090": 1.0}


def peak_tbs(device_name: str, override: float | None = None) -> float:
    """The HBM peak in TB/s for a device name (``torch.cuda.get_device_name()``); ``override`` wins.
    Raises ``ValueError`` for a device not in :data:`HBM_TBS` without an override."""
    if override:
        return override
    for key, tbs in HBM_TBS.items():
        if key in device_name:
            return tbs
    raise ValueError(f"no HBM peak known for {device_name!r}: pass --peak-tbs (known: {sorted(HBM_TBS)})")


def projection_cost(out: int, inp: int, k_out: int, k_in: int, elem: int, in_place: bool = True) -> dict:
    """Bytes and FLOPs of one residual projection of an ``out×in`` gradient of ``elem``-byte elements
    with bases of ``k_out``/``k_in`` columns (0: that side absent) on the fused path: read ``G``
    (twice when two-sided: the column pass, then the row kernel), write the result, read the bases,
    and two-sided write and read ``P`` (``k_out×in`` fp32) and the offset ``U(PV)`` (``out×k_in`` fp32).
    FLOPs: ``G V`` and ``Q Vᵀ`` (``4·out·in·k_in``), two-sided ``Uᵀ G`` and ``U P`` (``4·out·in·k_out``)."""
    g = out * inp * elem
    nbytes = g * (2 if k_out else 1) + g + (inp * k_in + out * k_out) * elem
    if k_out:
        nbytes += 2 * k_out * inp * 4 + 2 * out * k_in * 4
    return {"bytes": nbytes, "flops": 4 * out * inp * (k_in + k_out), "in_place": in_place}


def sketch_cost(tokens: int, a: int, b: int, K: int, L: int, elem: int) -> dict:
    """Bytes and FLOPs of one sketch update (``A`` ``tokens×a``, ``B`` ``tokens×b``, widths ``K``,
    ``L``): ``A`` and ``B`` read once, the test matrices read, the fp32 accumulators written."""
    nbytes = tokens * (a + b) * elem + (b * K + a * L) * elem + (a * K + b * L) * 4
    return {"bytes": nbytes, "flops": 2 * tokens * (b * K + a * K + a * L + b * L)}


def verdict(cost: dict, seconds: float, tbs: float) -> dict:
    """The HBM-bound limit of ``cost`` at ``tbs`` TB/s and the share of it a measured ``seconds`` reaches."""
    limit = cost["bytes"] / (tbs * 1e12)
    return {"bytes": cost["bytes"], "flops": cost["flops"], "limit_ms": limit * 1e3, "ms": seconds * 1e3,
            "percent_of_limit": 100.0 * limit / seconds, "tflops": cost["flops"] / seconds / 1e12}


def line(name: str, v: dict, tbs: float) -> str:
    """One printed line: ``ROOFLINE`` tag (gpu_check.sh collects these), the figures and the percentage."""
    return (f"ROOFLINE {name}: {v['bytes'] / 1e6:.1f} MB, {v['flops'] / 1e9:.1f} GFLOP, {v['ms']:.3f} ms vs "
            f"HBM limit {v['limit_ms']:.3f} ms at {tbs} TB/s = {v['percent_of_limit']:.0f}% of the limit "
            f"({v['tflops']:.1f} TFLOP/s)")
