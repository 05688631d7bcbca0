#!/usr/bin/env bash
# The GPU checks in one go: the kernel, layer, placement, sketch-kernel and NCCL-DDP tests on CUDA, the peak
# memory of both placements (bench/gpu_memory.py), the projection figures (bench/gpu_projection.py),
# the sketch and boundary figures (bench/gpu_sketch.py), then the full-size benchmarks that run on CUDA.
# Runs from the source tree (no install): `bash bench/gpu_check.sh`. Results go under $OUT when it is
# set (the device tool), else under ./gpu_results. Needs torch with CUDA, triton, pytest,
# pytest-benchmark; peft is optional (its comparisons skip without it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_grouped_projection.py \
  tests/test_triton_projection.py tests/test_linear.py tests/test_placement.py tests/test_sketch_kernels.py \
  tests/test_distributed_engines.py::test_ddp_builds_with_nccl_and_host_resident_bases \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
# Peak memory of both basis placements on a 2-layer LLaMA-7B-shaped stack (issue 18), beside the items.
python bench/gpu_memory.py --layers 2 --tokens 2048 2>&1 | tee "$OUT/gpu_memory.txt"
mem_rc=${PIPESTATUS[0]}
# The HBM peak: KPLORA_HBM_TBS, else by device name (bench/roofline.py: H200 4.8, H100 3.35,
# A100-80GB 2.0, RTX 4090 1.0 TB/s).
PEAK=()
[ -n "${KPLORA_HBM_TBS:-}" ] && PEAK=(--peak-tbs "$KPLORA_HBM_TBS")
# The projection figures of the full-fine-tuning issue: bf16 4096×11008, ratio to the obvious
# composition, ROOFLINE lines (bytes, FLOPs, HBM-bound limit, % reached), the grouped layer.
python bench/gpu_projection.py "${PEAK[@]}" 2>&1 | tee "$OUT/gpu_projection.txt"
proj_rc=${PIPESTATUS[0]}
# Issue 12's GPU figures: the Triton sketch update against the bf16 two-GEMM torch form and its
# fraction of the one-read HBM limit; the boundaries (data pass, begin_task) on a bf16 LLaMA-7B stack.
python bench/gpu_sketch.py "${PEAK[@]}" 2>&1 | tee "$OUT/gpu_sketch.txt"
sketch_rc=${PIPESTATUS[0]}
# Only the benchmark files that run on CUDA: the others (boundaries, subspace, methods, the LLaMA layer)
# are CPU benchmarks and would spend the device's minutes on its host CPU.
KPLORA_BENCH_FULL=1 python -m pytest -q -p no:cacheprovider bench/test_bench_linear.py bench/test_bench_projection.py \
  --benchmark-only \
  --benchmark-columns=min,median,rounds --benchmark-json="$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
# The percentage of the HBM-bound limit reached, one line per timed op (bench/roofline.py).
echo "== percentage of the HBM-bound limit reached ==" | tee "$OUT/roofline.txt"
grep -h '^ROOFLINE' "$OUT/gpu_projection.txt" "$OUT/gpu_sketch.txt" | sed 's/^ROOFLINE //' | tee -a "$OUT/roofline.txt"
echo "tests rc=$tests_rc memory rc=$mem_rc projection rc=$proj_rc sketch rc=$sketch_rc bench rc=$bench_rc" \
  | tee "$OUT/summary.txt"
exit $(( tests_rc || mem_rc || proj_rc || sketch_rc || bench_rc ))
