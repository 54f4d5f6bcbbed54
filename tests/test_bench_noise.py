"""Rows whose samples are too spread (a busy machine) are reported as noisy, not as results."""
import json

import torch

from fromage_fused.bench import __main__ as cli
from fromage_fused.bench import measure, report, runner
from fromage_fused.bench import presets as P

TINY = P.Preset("tiny", "", lambda: [(3,), (4, 2)], lambda: [(3,), (4, 2)])


def test_spread_is_the_interquartile_range_over_the_median():
    assert measure.Timing([1.0, 1.0, 1.0, 1.0, 1.0]).spread == 0.0
    assert measure.Timing([1.0, 1.1, 1.2, 1.3, 1.4]).spread == (1.3 - 1.1) / 1.2
    assert measure.Timing([0.001, 0.001, 0.001, 2.0, 11.9]).spread > 100


def _rows(monkeypatch, samples, **config):
    """A run whose every timing is ``samples`` (seconds)."""
    monkeypatch.setattr(measure, "time_step", lambda *a, **k: measure.Timing(list(samples)))
    cfg = runner.Config(device=torch.device("cpu"), presets=[TINY], contender_patterns=["loop", "fromage:foreach"],
                        repeats=5, warmup=1, copy_bytes=2**20, progress=False, plot=False, **config)
    rows, _ = runner.run(cfg, log=lambda msg: None)
    return rows


def test_a_steady_row_is_a_result(monkeypatch):
    rows = _rows(monkeypatch, [1e-3, 1.05e-3, 1.1e-3, 1.1e-3, 1.2e-3])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert report.noise_warning(rows) is None
    assert all(r["vs_loop"] is not None for r in rows)


def test_a_spread_row_is_noisy_has_no_ratios_and_is_no_baseline(monkeypatch):
    rows = _rows(monkeypatch, [1e-3, 1e-3, 2e-3, 9e-3, 11.9])
    assert [r["status"] for r in rows] == ["noisy", "noisy"]
    assert all("the machine was busy" in r["note"] and r["vs_loop"] is None for r in rows)
    assert all(r["median_ms"] == 2.0 for r in rows)  # the samples stay in the files, for a look
    table = report.format_table(rows)
    assert "noisy" in table and "the machine was busy" in table
    assert "2.000" not in table  # the median is not printed as a result
    assert "2 of 2 rows" in report.noise_warning(rows)
    # The limit is a setting.
    rows = _rows(monkeypatch, [1e-3, 1e-3, 2e-3, 9e-3, 11.9], max_spread=float("inf"))
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_the_cli_warns_on_stderr(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(P, "PRESETS", {"tiny": TINY})
    monkeypatch.setattr(cli, "_copy_bytes", lambda device: 2**20)
    monkeypatch.setattr(measure, "time_step", lambda *a, **k: measure.Timing([1e-3, 1e-3, 2e-3, 9e-3, 11.9]))
    args = ["--presets", "tiny", "--contenders", "loop", "--out", str(tmp_path), "--name", "n", "--no-plot",
            "--no-progress"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "noisy" in captured.out and "warning: 1 of 1 rows had samples too spread" in captured.err
    assert json.loads((tmp_path / "n.json").read_text())["rows"][0]["status"] == "noisy"
    assert cli.main(["--from-json", str(tmp_path / "n.json"), "--no-plot"]) == 0
    assert "warning: 1 of 1 rows" in capsys.readouterr().err
