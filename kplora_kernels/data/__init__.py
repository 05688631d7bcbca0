"""The commands' data: the demo's embedded digits (no downloads), the MTIL loaders and the IDX reader."""
