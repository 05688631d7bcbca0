"""Benchmark sizes: quick by default (what ``make test`` runs once), full with KPLORA_BENCH_FULL=1."""
import os

FULL = os.environ.get("KPLORA_BENCH_FULL") == "1"
