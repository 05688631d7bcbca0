"""The summary of speed-up ratios against the baselines, computed from the timings of the same run."""
from collections import defaultdict


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        if bench.stats is not None and "method" in bench.extra_info:
            groups[bench.group][bench.extra_info["method"]] = bench.stats.min
    lines = []
    for group, times in sorted(groups.items()):
        ours = {m: t for m, t in times.items() if m.startswith("ours")}
        for name, t in sorted(ours.items()):
            ratios = ", ".join(f"{base}/{name} = {times[base] / t:.2f}x"
                               for base in sorted(times) if not base.startswith("ours"))
            lines.append(f"{group}: {name} {t * 1e3:.2f} ms; {ratios}")
    if lines:
        terminalreporter.write_sep("-", "speed-up (min time of baseline / min time of ours, same run)")
        for line in lines:
            terminalreporter.write_line(line)
