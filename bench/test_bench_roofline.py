"""The roofline arithmetic the GPU scripts print (bench/roofline.py): bytes per call from the shapes,
the HBM peaks by device name, the percentage of the HBM-bound limit."""
import pytest

import roofline


def test_projection_bytes_and_flops():
    one = roofline.projection_cost(4096, 11008, 0, 64, 2)
    assert one["bytes"] == 2 * 4096 * 11008 * 2 + 11008 * 64 * 2  # read G, write G, read V
    assert one["flops"] == 4 * 4096 * 11008 * 64
    two = roofline.projection_cost(4096, 11008, 64, 64, 2)
    extra = 4096 * 11008 * 2 + 4096 * 64 * 2 + 2 * 64 * 11008 * 4 + 2 * 4096 * 64 * 4  # 2nd read, U, P, U(PV)
    assert two["bytes"] - one["bytes"] == extra and two["flops"] == 2 * one["flops"]


def test_peaks_by_device_and_the_percentage():
    assert roofline.peak_tbs("NVIDIA H200") == 4.8
    assert roofline.peak_tbs("NVIDIA A100-SXM4-80GB") == 2.0
    assert roofline.peak_tbs("NVIDIA GeForce RTX 4090") == 1.0
    assert roofline.peak_tbs("anything", 3.0) == 3.0
    with pytest.raises(ValueError, match="--peak-tbs"):
        roofline.peak_tbs("Tesla T4")
    cost = roofline.sketch_cost(2048, 11008, 4096, 40, 81, 2)
    limit = cost["bytes"] / 4.8e12
    assert roofline.verdict(cost, limit, 4.8)["percent_of_limit"] == pytest.approx(100.0)
    assert roofline.verdict(cost, 4 * limit, 4.8)["percent_of_limit"] == pytest.approx(25.0)
    assert "25% of the limit" in roofline.line("x", roofline.verdict(cost, 4 * limit, 4.8), 4.8)
