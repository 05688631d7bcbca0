"""The ``kplora`` commands, one module each (:mod:`kplora_kernels.cli` registers them): ``demo``,
``mtil``, ``llava``, ``vlm``, ``memory`` (and ``kernels``, in :mod:`kplora_kernels.kernel_report`).

Each module has ``add_arguments(parser)`` and ``main(args)``. What the task-sequence commands
share is in :mod:`.common` (options, resume, one task's lifecycle, evaluation rows, export, results)
and, for the two instruction-tuning commands, :mod:`.chat`.
"""
