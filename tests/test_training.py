"""The pieces the training commands share: schedules, gradient accumulation, rank-0 logging,
settings checks and the resume comparison."""
import math
from dataclasses import dataclass

import pytest
import torch

from helpers import raises
from kplora_kernels import training
from kplora_kernels.config_file import ConfigError, check_settings, describe_settings, load_settings, setting
from kplora_kernels.continual.runs import differences
from kplora_kernels.training import make_scheduler, train_steps


def lrs(schedule, total, warmup, lr=0.1):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, schedule, total, warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_is_the_formula():
    total, warmup = 100, 0.03  # the authors' LLaVA schedule: 3 warm-up steps, then cosine to 0
    got = lrs("cosine", total, warmup)
    expected = [0.1 * (s + 1) / 4 if s < 3 else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 97)) for s in range(total)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs("constant", 10, 0.0) == [0.1] * 10
    assert lrs("constant", 10, 0.2)[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])


@pytest.mark.parametrize("total", [2, 3, 5, 1000])
def test_onecycle_is_torchs_and_runs_for_any_step_count(total):
    got = lrs("onecycle", total, 0.3)
    assert len(got) == total and all(0 < v <= 0.1 + 1e-12 for v in got)
    assert got[0] == pytest.approx(0.1 / 25)  # torch's div_factor: starts at max_lr/25
    if total == 1000:  # the peak at pct_start = 0.3, as torch.optim.lr_scheduler.OneCycleLR with defaults
        assert max(range(total), key=got.__getitem__) == 299 and max(got) == pytest.approx(0.1)
        assert got[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)
    assert lrs("onecycle", 1, 0.3) == [0.1]


def test_scheduler_arguments_are_checked():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with raises(ValueError, "schedule must be one of", "'linear'"):
        make_scheduler(opt, "linear", 10, 0.1)
    with raises(ValueError, "total_steps must be an int ≥ 1, got 0"):
        make_scheduler(opt, "cosine", 0, 0.1)
    with raises(ValueError, "warmup_fraction must be in [0, 1), got 1.0"):
        make_scheduler(opt, "cosine", 10, 1.0)


def _fit(batches, accumulation):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731
    result = train_steps(loss_fn, batches, len(batches), opt, accumulation=accumulation)
    return model, result


def test_gradient_accumulation_averages_the_batches_of_a_step():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(12, 1, generator=gen, dtype=torch.float64)
    small = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 12, 2)]  # 6 batches of 2
    large = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]  # 3 batches of 4
    a, ra = _fit(small, accumulation=2)
    b, rb = _fit(large, accumulation=1)
    assert ra["steps"] == rb["steps"] == 3
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # 5 batches, 2 a step: the last step averages the one batch left
    c, rc = _fit(small[:5], accumulation=2)
    d, _ = _fit([(x[:4], y[:4]), (x[4:8], y[4:8]), small[4]], accumulation=1)
    assert rc["steps"] == 3
    for p, q in zip(c.parameters(), d.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_non_finite_loss_stops_training_with_its_step():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.ones(1, 2), torch.full((1, 2), float("nan"))]
    with raises(FloatingPointError, "demo: the loss is nan at step 2 of 2"):
        train_steps(lambda b: model(b).sum(), batches, 2, opt, desc="demo")
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken


def test_only_rank_0_reports(monkeypatch, capsys):
    training.setup_logging()
    training.log.info("from rank 0")
    monkeypatch.setattr(training, "is_rank0", lambda: False)
    training.log.info("information from rank 1")
    training.log.warning("a warning from rank 1")
    out = capsys.readouterr().out
    assert "from rank 0" in out and "information" not in out and "a warning from rank 1" in out
    assert training.progress(range(3), total=3).disable  # no bar on other ranks


@dataclass
class Example:
    count: int = setting(1, "a count", ge=1)
    share: float = setting(0.5, "a share", gt=0, le=1)
    name: str = setting("a", "a choice", choices=("a", "b"))
    names: list[str] = setting(default_factory=list, help="names")
    limit: int | None = setting(None, "a limit", ge=0)
    flag: bool = setting(False, "a flag", affects_results=False)


@pytest.mark.parametrize("data,fragment", [
    ({"count": 0}, "count must be an integer ≥ 1, got 0"),
    ({"count": 1.0}, "count must be an integer ≥ 1, got 1.0"),
    ({"count": "1"}, "count must be an integer ≥ 1, got '1'"),
    ({"count": None}, "count must be an integer ≥ 1, got None"),
    ({"share": 0}, "share must be a number in (0, 1], got 0"),
    ({"share": float("nan")}, "share must be a number in (0, 1], got nan"),
    ({"share": True}, "share must be a number in (0, 1], got True"),
    ({"name": "c"}, "name must be one of 'a', 'b', got 'c'"),
    ({"names": "ab"}, "names must be a list of strings, got 'ab'"),
    ({"names": ["a", 1]}, "names must be a list of strings, got ['a', 1]"),
    ({"limit": -1}, "limit must be an integer ≥ 0 or null, got -1"),
    ({"flag": "false"}, "flag must be true or false, got 'false'"),
])
def test_every_setting_is_checked_by_type_and_range(data, fragment):
    with raises(ConfigError, "where.json: " + fragment):
        check_settings(Example, data, "where.json")


def test_valid_settings_pass_and_are_described(tmp_path):
    check_settings(Example, {"count": 3, "share": 1, "name": "b", "names": ["x"], "limit": None, "flag": True}, "x")
    path = tmp_path / "c.json"
    path.write_text('{"count": 2, "limit": 0}')
    assert load_settings(Example, str(path)) == Example(count=2, limit=0)
    text = describe_settings(Example)
    assert "  count = 1: a count [an integer ≥ 1]" in text
    assert "  flag = false: a flag (may change when resuming) [true or false]" in text


def test_differences_name_each_changed_key():
    old = {"model": "m", "config": {"lr": 0.1, "rank": 4}}
    new = {"model": "m", "config": {"lr": 0.2, "rank": 4, "amp": True}}
    assert differences(old, new) == ["config.amp (absent there, true now)", "config.lr (0.1 there, 0.2 now)"]
    assert differences(old, old) == []


def test_heatmap_draws_the_base_column_and_checks_its_length(tmp_path):
    pytest.importorskip("matplotlib")
    from kplora_kernels.continual.report import heatmap

    path = tmp_path / "h.png"
    heatmap(str(path), "t", [[0.9, 0.1], [0.5, 0.8]], ["a", "b"], extra_columns={"base": [0.7, 0.6]})
    assert path.read_bytes()[:4] == b"\x89PNG"
    with raises(ValueError, "extra column 'base' must have one value per row (2), got shape (3,)"):
        heatmap(str(path), "t", [[0.9, 0.1], [0.5, 0.8]], ["a", "b"], extra_columns={"base": [0.7, 0.6, 0.5]})


def test_without_a_terminal_the_running_loss_is_logged(capsys):
    training.setup_logging()
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.ones(4, 2)] * 20
    result = train_steps(lambda b: model(b).pow(2).mean(), batches, 20, opt, desc="job", reports=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("job: ")]
    assert [line.split(",")[0] for line in lines] == [f"job: step {s}/20" for s in (5, 10, 15, 20)]
    assert lines[-1].endswith(f"running loss {result['loss']:.4f}, lr 0.01")


def test_a_yaml_number_read_as_text_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("share: 1e-3\n")  # YAML 1.1 (PyYAML) reads this as a string
    with raises(ConfigError, "share must be a number in (0, 1], got '1e-3'", "write 1.0e-3"):
        load_settings(Example, str(path))
