"""The benchmark CLI end to end on CPU, with tiny presets: every file, every column, every contender."""
import csv
import json

import pytest
import torch

import fromage_fused
from fromage_fused.bench import __main__ as cli
from fromage_fused.bench import external
from fromage_fused.bench import presets as P
from fromage_fused.bench.report import COLUMNS

TINY = {
    "tiny": P.Preset("tiny", "a few odd tensors", lambda: [(3, 5), (7,), (1,), (64, 3)],
                     lambda: [(3, 5), (7,), (1,), (64, 3)]),
    "tiny-many": P.Preset("tiny-many", "many small tensors", lambda: P.many_small(40, 256),
                          lambda: P.many_small(40, 256)),
}
NUMERIC_OK = ["repeats", "median_ms", "q1_ms", "q3_ms", "work_bytes_per_param", "traffic_bytes_per_param", "gbps",
              "traffic_gbps", "copy_gbps", "frac_copy", "vs_loop", "vs_foreach", "vs_sgd", "vs_adamw"]


@pytest.fixture
def tiny_presets(monkeypatch):
    monkeypatch.setattr(P, "PRESETS", TINY)
    monkeypatch.setitem(P.QUICK, "cpu", list(TINY))
    # A small copy buffer keeps the test short; the arithmetic is the same.
    monkeypatch.setattr(cli, "_copy_bytes", lambda device: 2**22)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "PRESETS", TINY)
    mp.setitem(P.QUICK, "cpu", list(TINY))
    mp.setattr(cli, "_copy_bytes", lambda device: 2**22)
    out = tmp_path_factory.mktemp("bench")
    try:
        code = cli.main(["--quick", "--device", "cpu", "--out", str(out), "--repeats", "3", "--sets", "2",
                         "--no-progress", "--max-spread",
                         "inf"])  # noise has its own test: these rows must all be results
    finally:
        mp.undo()
    return code, out


def test_quick_run_writes_json_csv_and_plot(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    data = json.loads((out / "bench-cpu-quick.json").read_text())
    assert data["columns"] == COLUMNS
    rows = data["rows"]
    expected = {"loop", "compile:foreach", "torch:sgd", "torch:adamw", "amp:fromage", "amp:adamw", "timm:lars",
                "timm:lamb"} | {f"{rule}:{b}" for rule in ("fromage", "lars", "lamb")
                                for b in fromage_fused.available_backends("cpu")}
    assert {r["contender"] for r in rows} == expected
    assert len(rows) == len(TINY) * len(expected)
    try:
        external.timm_optimizers()
        skipped = {"compile:foreach": "compile"}
    except external.Unavailable:
        skipped = {"compile:foreach": "compile", "timm:lars": "timm", "timm:lamb": "timm"}
    for r in rows:
        assert list(r) == COLUMNS
        assert r["device"] == "cpu" and r["torch"] and r["date"] and r["device_name"]
        if r["contender"] in skipped:
            assert r["status"] == "skipped" and skipped[r["contender"]] in r["note"]
            assert r["median_ms"] is None
            continue
        assert r["status"] == "ok", r
        for column in NUMERIC_OK:
            assert isinstance(r[column], (int, float)) and r[column] > 0, (column, r)
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
    loop = [r for r in rows if r["contender"] == "loop"]
    assert all(r["vs_loop"] == pytest.approx(1.0) for r in loop)

    with (out / "bench-cpu-quick.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        csv_rows = list(reader)
    assert [r["contender"] for r in csv_rows] == [r["contender"] for r in rows]
    assert all(float(c["median_ms"]) == pytest.approx(j["median_ms"])
               for c, j in zip(csv_rows, rows) if j["status"] == "ok")

    assert (out / "bench-cpu-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_json_prints_every_contender(quick_run, capsys):
    _, out = quick_run
    assert cli.main(["--from-json", str(out / "bench-cpu-quick.json"), "--no-plot"]) == 0
    table = capsys.readouterr().out
    for name in ["loop", "fromage:foreach", "torch:sgd", "torch:adamw", "tiny-many", "copy bandwidth"]:
        assert name in table


def test_unknown_preset_or_contender_is_a_clear_error(tmp_path, capsys, tiny_presets):
    assert cli.main(["--presets", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["--presets", "tiny", "--contenders", "fromage:nope", "--out", str(tmp_path)]) == 2
    assert "no contender matches" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_selected_contenders_bf16_and_fresh_grads(tmp_path, tiny_presets):
    args = ["--presets", "tiny", "--contenders", "fromage:foreach,torch:sgd", "--dtype", "bfloat16", "--fresh-grads",
            "--repeats", "3", "--warmup", "1", "--sets", "2", "--out", str(tmp_path), "--name", "sel", "--no-plot",
            "--no-progress"]
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "sel.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["fromage:foreach", "torch:sgd"]
    assert all(r["dtype"] == "bfloat16" and r["fresh_grads"] for r in rows)
    assert [r["work_bytes_per_param"] for r in rows] == [10, 6]
    assert not (tmp_path / "sel.png").exists()


def test_misaligned_views(tmp_path, tiny_presets):
    # Parameters and gradients carved out of buffers at element offsets, as flat-buffer views are:
    # what the kernels' misaligned paths are measured with.
    params, grads = P.make_tensors([(3, 5), (64, 3)], dtype=torch.float32,
                                   device="cpu", seed=0, misalign=(1, 3))
    assert all(p.data_ptr() % 16 == 4 and g.data_ptr() % 16 == 12 for p, g in zip(params, grads))
    args = ["--presets", "tiny", "--contenders", "fromage:cpu,fromage:foreach", "--misalign", "1,1", "--fresh-grads",
            "--repeats", "3", "--warmup", "1", "--sets", "2", "--out", str(tmp_path), "--name", "mis", "--no-plot",
            "--no-progress", "--max-spread", "inf"]  # (noise has its own test: these rows must be results)
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "mis.json").read_text())["rows"]
    # (a row whose samples a busy machine spread is "noisy": it ran all the same)
    assert [r["misalign"] for r in rows] == ["1,1", "1,1"] and all(r["status"] in ("ok", "noisy") for r in rows)
    assert cli.main(args[:4] + ["--misalign", "1", "--out", str(tmp_path)]) == 2
