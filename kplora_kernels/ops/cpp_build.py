"""Where the C++ kernels live and how they are compiled: read by ``setup.py`` (ahead-of-time build)
and by :mod:`kplora_kernels.ops.cpp` (JIT fallback). Imports nothing, so setup.py can run it."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(REPO_ROOT, "csrc", "residual_project.cpp")]
# -fopenmp: at::parallel_for only runs in parallel when the caller is compiled with OpenMP.
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
