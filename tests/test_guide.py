"""The examples of docs/training.md run as written; the compiled one gives the eager result."""
import pathlib
import re

import pytest
import torch

from _training_setup import one_thread

GUIDE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "training.md"
#: compiled vs eager after the example's 10 steps (inductor may reorder fp32 arithmetic)
COMPILE_TOL = (1e-6, 1e-5)


def examples():
    text = GUIDE.read_text()
    found = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
        assert len(blocks) == 1, f"section {title!r} should hold one example"
        found[title] = blocks[0]
    return found


EXAMPLES = examples()


def run(code):
    namespace = {"__name__": "guide_example"}
    with one_thread():
        exec(compile(code, str(GUIDE), "exec"), namespace)
    return namespace


def test_guide_has_the_four_sections():
    assert [t.split()[0] for t in EXAMPLES] == ["Mixed", "CUDA", "torch.compile", "bf16"]


def test_amp_example():
    ns = run(EXAMPLES["Mixed precision with GradScaler"])
    assert torch.isfinite(ns["loss"]) and not hasattr(ns["opt"], "grad_scale")


@pytest.mark.gpu
def test_cuda_graph_example():
    ns = run(EXAMPLES["CUDA graphs"])
    assert torch.isfinite(ns["static_loss"]).item()
    assert ns["opt"].param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.5 ** 2)


def test_compile_example_matches_eager():
    code = EXAMPLES["torch.compile"]
    decorator = "@torch.compile(fullgraph=False)\n"
    assert decorator in code
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(code)
    eager = run(code.replace(decorator, ""))
    atol, rtol = COMPILE_TOL
    for (name, a), b in zip(compiled["model"].named_parameters(), eager["model"].parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)
    assert compiled["opt"].param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.5 ** 2)
    torch._dynamo.reset()


def test_bf16_example():
    ns = run(EXAMPLES["bf16 weights: stochastic rounding or fp32 master weights"])
    seed = ns["opt"].state[next(ns["model"].parameters())]["sr_seed"]
    assert seed.dtype == torch.int64
