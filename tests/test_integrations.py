"""The recipes of docs/integrations.md run as written against the real libraries, and do what the
page says: Trainer resumes exactly, accelerate restores the state, Lightning trains in bf16-mixed
and resumes, timm creates Fromage by name, OneCycleLR needs cycle_momentum=False, clipping by norm
changes nothing, SWA averages.

CI installs the libraries (the ``integrations`` extra; timm where a matching torchvision loads):
there, a missing one fails the test instead of skipping it.
"""
import os
import pathlib
import re
import warnings

import pytest
import torch

from fromage_fused import Fromage

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def examples():
    found = {}
    for section in re.split(r"^## ", PAGE.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        assert len(blocks) <= 1, f"section {title!r} should hold at most one example"
        if blocks:
            found[title] = blocks[0]
    return found


EXAMPLES = examples()


def need(module):
    """Import ``module``; skip without it, except in CI, which installs it."""
    if IN_CI:
        return __import__(module)
    return pytest.importorskip(module)


def run(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes write their checkpoints to the working directory
    namespace = {"__name__": "integrations_example"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        exec(compile(EXAMPLES[title], f"{PAGE}::{title}", "exec"), namespace)
    namespace["_fromage_warnings"] = [str(w.message) for w in record
                                      if "weight decay" in str(w.message) or "stay zero" in str(w.message)]
    return namespace


def params_of(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def test_the_page_has_its_examples():
    assert list(EXAMPLES) == ["Hugging Face Trainer", "Hugging Face Accelerate", "PyTorch Lightning", "timm",
                              "Learning-rate schedulers", "Gradient clipping", "Stochastic weight averaging"]


def test_hf_trainer(tmp_path, monkeypatch, one_thread):
    need("transformers")
    ns = run("Hugging Face Trainer", tmp_path, monkeypatch)
    assert ns["_fromage_warnings"] == []  # Trainer's groups are replaced, and its weight_decay is 0
    assert type(ns["trainer2"].optimizer.optimizer) is Fromage
    bounded, free = ns["trainer2"].optimizer.param_groups[:2]
    assert bounded["p_bound"] == 1.0 and free["p_bound"] is None and free["params"]
    # Resumed from step 4, the second run ends where the uninterrupted one did.
    want, got = params_of(ns["model"]), params_of(ns["resumed"])
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # The bounds come from the checkpoint (the weights before step 1), not from the weights at step 4.
    def bounds(opt):
        return [opt.state[p]["max_norm"] for g in opt.param_groups if g["p_bound"] for p in g["params"]]
    want_bounds, got_bounds = bounds(ns["optimizer"]), bounds(ns["trainer2"].optimizer.optimizer)
    assert len(want_bounds) == len(got_bounds) > 0
    assert all(torch.equal(a, b) for a, b in zip(want_bounds, got_bounds))
    start = params_of(ns["tiny_gpt2"]())
    assert any(not torch.equal(start[n], want[n]) for n in want if n.endswith("bias"))  # biases moved


def test_hf_trainer_own_groups_warn_about_weight_decay(tmp_path, monkeypatch, one_thread):
    transformers = need("transformers")
    ns = run("Hugging Face Trainer", tmp_path, monkeypatch)  # defines the helpers
    args = transformers.TrainingArguments(output_dir="wd", max_steps=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, weight_decay=0.1)
    trainer = transformers.Trainer(model=ns["tiny_gpt2"](), args=args, train_dataset=ns["Tokens"](),
                                   optimizer_cls_and_kwargs=(Fromage, {"lr": 0.01}))
    with pytest.warns(UserWarning, match="Fromage has no weight decay: the weight_decay of param group 0 "):
        trainer.train()


def test_accelerate(tmp_path, monkeypatch, one_thread):
    need("accelerate")
    ns = run("Hugging Face Accelerate", tmp_path, monkeypatch)
    opt = ns["optimizer"].optimizer
    assert type(opt) is Fromage and ns["_fromage_warnings"] == []
    saved = {i: s["max_norm"].clone() for i, s in enumerate(opt.state.values()) if "max_norm" in s}
    assert saved and all(v > 0 for v in saved.values())  # set at the first step
    for s in opt.state.values():
        if "max_norm" in s:
            s["max_norm"].fill_(123.0)
    opt.param_groups[0]["lr"] = 0.5
    ns["accelerator"].load_state("accelerate-out")
    restored = {i: s["max_norm"] for i, s in enumerate(opt.state.values()) if "max_norm" in s}
    assert all(torch.equal(restored[i], saved[i]) for i in saved)
    assert opt.param_groups[0]["lr"] == 0.01


def test_lightning(tmp_path, monkeypatch, one_thread):
    need("lightning")
    ns = run("PyTorch Lightning", tmp_path, monkeypatch)
    assert ns["_fromage_warnings"] == []
    first, second = ns["trainer"], ns["resumed"]
    assert type(first.optimizers[0]) is Fromage and first.precision == "bf16-mixed"
    assert first.global_step == 8 and second.global_step == 16  # resumed at step 8, not restarted
    opt = second.optimizers[0]
    assert all(s["max_norm"] > 0 for s in opt.state.values() if "max_norm" in s)


def test_timm(tmp_path, monkeypatch, one_thread):
    try:
        import torchvision  # noqa: F401  (timm imports it)
    except Exception as error:  # torchvision's wheels fit one torch release each
        pytest.skip(f"no torchvision loads with torch {torch.__version__} here, and timm needs one: "
                    f"{type(error).__name__}: {str(error)[:120]}")
    timm = need("timm")
    ns = run("timm", tmp_path, monkeypatch)
    opt = ns["optimizer"]
    assert type(opt) is Fromage and ns["_fromage_warnings"] == []
    assert "fromage" in timm.optim.list_optimizers()
    # timm's own groups, as train.py builds them with its default weight decay: one warning.
    with pytest.warns(UserWarning, match="Fromage has no weight decay"):
        timm.optim.create_optimizer_v2(ns["model"], "fromage", lr=0.01, weight_decay=2e-5)
    # The public route: a registry of one's own.
    registry = timm.optim.OptimizerRegistry()
    registry.register(timm.optim.OptimInfo(name="fromage", opt_class=Fromage, has_eps=False))
    assert type(registry.create_optimizer(ns["model"], "fromage", lr=0.01)) is Fromage
    model = ns["model"]
    before = params_of(model)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in params_of(model).items())


def test_one_cycle_needs_cycle_momentum_off(tmp_path, monkeypatch):
    ns = run("Learning-rate schedulers", tmp_path, monkeypatch)
    lrs = ns["lrs"]
    assert max(lrs) == pytest.approx(0.01) and lrs[0] < 0.001 and lrs[-1] < 1e-4
    with pytest.raises(ValueError, match="momentum or beta1"):
        torch.optim.lr_scheduler.OneCycleLR(Fromage(torch.nn.Linear(2, 2).parameters()), max_lr=0.01, total_steps=5)


def test_clipping_by_norm_changes_nothing(tmp_path, monkeypatch):
    ns = run("Gradient clipping", tmp_path, monkeypatch)
    clipped, plain = params_of(ns["clipped"]), params_of(ns["plain"])
    for name in plain:
        torch.testing.assert_close(clipped[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    # ...while the same clipping changes an SGD run: the test can tell them apart.
    def sgd(clip):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            model(ns["x"]).square().mean().backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
            opt.step()
        return params_of(model)
    a, b = sgd(True), sgd(False)
    assert any(not torch.allclose(a[n], b[n], rtol=1e-4) for n in a)


def test_swa(tmp_path, monkeypatch):
    ns = run("Stochastic weight averaging", tmp_path, monkeypatch)
    swa, model = ns["swa_model"], ns["model"]
    assert swa.n_averaged.item() == 3
    assert ns["optimizer"].param_groups[0]["lr"] == pytest.approx(0.005)
    averaged = dict(swa.module.named_parameters())
    assert any(not torch.equal(averaged[n], p) for n, p in model.named_parameters())
