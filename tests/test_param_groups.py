"""The two traps a param group can hold, and fromage_fused.param_groups that avoids the first.

- A p_bound group holding an all-zero tensor: one warning naming it, at construction or
  add_param_group, and none otherwise (the tensor would stay zero for ever: shown here too).
- A non-zero weight_decay (what HF Trainer, timm and pytorch_optimizer's factories pass): accepted,
  checked, saved, ignored with one warning naming the groups; zero is silent.
"""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage, param_groups


def caught(fn):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def about(messages, word):
    return [m for m in messages if word in m]


class TinyGPT(nn.Module):
    """GPT-2's parameter shapes and inits in small: zero biases, LayerNorms, tied embeddings."""

    def __init__(self, vocab=32, width=16, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(8, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for block in self.blocks:
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)

    def forward(self, idx):
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.ln_f(h) @ self.wte.weight.T


def train(model, opt, steps=5):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 32, (4, 8), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()


def zero_biases(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("bias") and not p.any()}


# --- p_bound and all-zero tensors -----------------------------------------------------------------

def test_the_trap_is_real_and_the_helper_avoids_it():
    torch.manual_seed(0)
    model = TinyGPT()
    frozen = zero_biases(model)
    assert len(frozen) >= 8  # attention, MLP and LayerNorm biases
    opt, messages = caught(lambda: Fromage(model.parameters(), lr=0.01, p_bound=1.0))
    [warning] = about(messages, "stay zero")
    assert f"{len(frozen)} parameters" in warning
    train(model, opt)
    assert all(not p.any() for p in frozen.values())  # what the warning says: they never moved

    torch.manual_seed(0)
    model = TinyGPT()
    frozen = zero_biases(model)
    opt, messages = caught(lambda: Fromage(param_groups(model, p_bound=1.0), lr=0.01))
    assert messages == []
    bounded, rest = opt.param_groups
    assert bounded["p_bound"] == 1.0 and rest["p_bound"] is None
    assert all(p.dim() >= 2 for p in bounded["params"])
    assert all(p.dim() < 2 for p in rest["params"])
    train(model, opt)
    assert all(p.any() for p in frozen.values())  # every bias moved


def test_zero_warning_names_the_parameters_once_for_all_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    nn.init.zeros_(model[0].bias)
    nn.init.zeros_(model[2].weight)
    groups = [{"params": list(model[0].named_parameters(prefix="0"))},
              {"params": list(model[1].named_parameters(prefix="1"))},
              {"params": list(model[2].named_parameters(prefix="2")), "p_bound": 2.0}]
    _, messages = caught(lambda: Fromage(groups, p_bound=1.0))
    [warning] = messages
    assert "param group 0: 1 parameter: '0.bias'" in warning
    assert "param group 2: 1 parameter: '2.weight'" in warning
    assert "'1." not in warning and "'2.bias'" not in warning


def test_zero_warning_without_names_gives_positions_and_shapes():
    w, b = torch.randn(3, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    _, messages = caught(lambda: Fromage([w, b], p_bound=1.0))
    [warning] = messages
    assert "params[1] (3,)" in warning and "params[0]" not in warning


@pytest.mark.parametrize("case", ["tiny-not-zero", "no-p_bound", "meta", "empty"])
def test_no_zero_warning_when_nothing_is_frozen(case):
    if case == "empty":  # no elements: nothing to freeze
        params, p_bound = [torch.randn(3, requires_grad=True), torch.zeros(0, 4, requires_grad=True)], 1.0
    elif case == "tiny-not-zero":
        params, p_bound = [torch.randn(3, 2, requires_grad=True), torch.full((3,), 1e-30, requires_grad=True)], 1.0
    elif case == "no-p_bound":
        params, p_bound = [torch.zeros(3, requires_grad=True)], None
    else:  # no values to read (deferred initialisation)
        params, p_bound = [torch.zeros(2, 2, device="meta", requires_grad=True)], 1.0
    _, messages = caught(lambda: Fromage(params, p_bound=p_bound, backend="foreach"))
    assert about(messages, "stay zero") == []


def test_zero_warning_fires_for_each_dtype_with_a_bound():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64):
        _, messages = caught(lambda: Fromage([torch.zeros(3, dtype=dtype, requires_grad=True)], p_bound=1.0))
        assert len(about(messages, "stay zero")) == 1, dtype


def test_add_param_group_warns_for_the_new_group_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    nn.init.zeros_(model[0].bias)
    opt, messages = caught(lambda: Fromage(model[0].parameters()))  # no bound: silent
    assert messages == []
    _, messages = caught(lambda: opt.add_param_group({"params": model[1].parameters(), "p_bound": 1.0}))
    assert messages == []
    other = nn.Linear(2, 2)
    nn.init.zeros_(other.bias)
    _, messages = caught(lambda: opt.add_param_group({"params": other.parameters(), "p_bound": 1.0}))
    [warning] = messages
    assert "param group 2: 1 parameter: params[1] (2,)" in warning


def test_the_check_reads_no_value_in_step():
    # The zero check is a host read: it belongs to construction; a step must not repeat it.
    from _host_reads import forbid_host_reads

    model = nn.Linear(3, 3)
    opt = Fromage(model.parameters(), p_bound=1.0, backend="foreach")
    model(torch.randn(2, 3)).sum().backward()
    with forbid_host_reads():
        opt.step()


# --- weight_decay ---------------------------------------------------------------------------------

def test_weight_decay_zero_is_silent_and_saved():
    model = nn.Linear(3, 2)
    opt, messages = caught(lambda: Fromage(model.parameters(), weight_decay=0.0))
    assert messages == []
    assert opt.param_groups[0]["weight_decay"] == 0.0
    _, messages = caught(lambda: Fromage([{"params": [model.weight], "weight_decay": 0},
                                          {"params": [model.bias], "weight_decay": 0.0}]))
    assert messages == []


def test_nonzero_weight_decay_warns_once_naming_the_groups():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    groups = [{"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}]
    _, messages = caught(lambda: Fromage(groups))
    [warning] = messages
    assert "no weight decay" in warning and "param group 0 (weight_decay=0.1, 2 parameters" in warning
    assert "param group 1" not in warning and "p_bound" in warning
    _, messages = caught(lambda: Fromage(nn.Linear(2, 2).parameters(), weight_decay=0.05))
    [warning] = messages
    assert "param group 0 (weight_decay=0.05" in warning


def test_weight_decay_in_add_param_group():
    opt = Fromage(nn.Linear(2, 2).parameters())
    _, messages = caught(lambda: opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "weight_decay": 1e-4}))
    assert len(about(messages, "no weight decay")) == 1
    _, messages = caught(lambda: opt.add_param_group({"params": nn.Linear(2, 2).parameters()}))
    assert messages == []
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "weight_decay": -1.0})
    assert len(opt.param_groups) == 3


@pytest.mark.parametrize("bad", [-1e-4, math.nan, math.inf, True, "0.1", None, torch.tensor(0.1)],
                         ids=["negative", "nan", "inf", "bool", "str", "none", "tensor"])
def test_bad_weight_decay_is_refused(bad):
    with pytest.raises(ValueError, match="weight_decay"):
        Fromage(nn.Linear(2, 2).parameters(), weight_decay=bad)
    with pytest.raises(ValueError, match="weight_decay"):
        Fromage([{"params": nn.Linear(2, 2).parameters(), "weight_decay": bad}])


def test_weight_decay_changes_nothing_and_round_trips():
    def run(**kwargs):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = Fromage(model.parameters(), lr=0.05, **kwargs)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 4)).square().sum().backward()
            opt.step()
        return model, opt

    plain, _ = run()
    decayed, opt = run(weight_decay=0.1)
    for a, b in zip(plain.parameters(), decayed.parameters()):
        assert torch.equal(a, b)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = Fromage(nn.Linear(4, 3).parameters())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["weight_decay"] == 0.1
    # A checkpoint from before the key existed (or from the authors' Fromage) gets the default.
    state = opt.state_dict()
    del state["param_groups"][0]["weight_decay"]
    fresh = Fromage(nn.Linear(4, 3).parameters())
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["weight_decay"] == 0.0


# --- the helper ------------------------------------------------------------------------------------

def test_helper_inputs_and_options():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    nn.init.zeros_(model[0].weight)
    bounded, rest = param_groups(model, 2.0, lr=0.003)
    assert bounded == {"params": [], "p_bound": 2.0, "lr": 0.003}  # 0.weight is zero, 1.weight frozen
    assert [p.shape for p in rest["params"]] == [(4, 3), (4,), (2,)] and rest["lr"] == 0.003
    model[1].weight.requires_grad_(True)
    nn.init.normal_(model[0].weight)
    bounded, _ = param_groups(model.named_parameters(), 1.0, unbounded=["1.*"])
    assert bounded["params"] == [model[0].weight]
    bounded, _ = param_groups(model.named_parameters(), 1.0, unbounded="0.weight")
    assert bounded["params"] == [model[1].weight]
    bounded, rest = param_groups(list(model.parameters()), None)
    assert bounded["p_bound"] is None and len(bounded["params"]) == 2
    with pytest.raises(TypeError, match="param_groups"):
        param_groups([1, 2], 1.0)
    assert fromage_fused.param_groups is param_groups
