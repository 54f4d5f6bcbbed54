"""Fromage (and LARS, a second rule) under FSDP2, hybrid and 2-D sharding, tensor-parallel Partial
gradients, DDP and DCP checkpoints: several CPU processes with gloo, compared with a single-process
run."""
import os
import sys

import pytest
import torch
import torch.distributed as dist

import fromage_fused

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9):
    pytest.skip("needs torch >= 2.9: before it FSDP2 under gloo sums gradients instead of averaging them",
                allow_module_level=True)
if not sys.platform.startswith("linux"):
    pytest.skip("the ranks are forked processes (Linux)", allow_module_level=True)

import _dist_worker as W  # noqa: E402
from conftest import backend_cases  # noqa: E402

BACKENDS = [name for _, name in backend_cases(("cpu",), reference=False)]

# (atol, rtol), rtol relative to the tensor's largest magnitude. The sharded runs sum gradients and
# stats in another order than one process does: fp32 rounding, compounded over W.STEPS steps.
PARITY_TOL = (1e-6, 1e-5)
ONE_ALL_REDUCE = {"c10d.allreduce_": 1}


@pytest.fixture(scope="module")
def dir2(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ranks2"))


def _kernels_before_forking():
    # The ranks are forked: Triton's kernels must be imported (under its interpreter) before.
    if "triton" in BACKENDS:
        from _interpreter_kernels import triton_on_cpu

        triton_on_cpu()


@pytest.fixture(scope="module")
def ranks2(dir2):
    _kernels_before_forking()
    return W.launch(2, dir2, BACKENDS)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory, dir2, ranks2):
    # the 4 ranks also resume from the checkpoint the 2 ranks saved
    _kernels_before_forking()
    return W.launch(4, str(tmp_path_factory.mktemp("ranks4")), BACKENDS, resume_from=os.path.join(dir2, "ckpt"))


@pytest.fixture(scope="module")
def single():
    _kernels_before_forking()
    return {b: W.single_process(b) for b in BACKENDS}


def _ranks(request, world):
    return request.getfixturevalue(f"ranks{world}")


def assert_params_close(got, want, what):
    assert got.keys() == want.keys()
    atol, rtol = PARITY_TOL
    for k in want:
        scale = want[k].abs().max().item() if want[k].numel() else 0.0
        torch.testing.assert_close(got[k], want[k], atol=atol + rtol * scale, rtol=0, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.backends(reference=False)
def test_fsdp_matches_single_process(request, single, world, backend):
    results = _ranks(request, world)
    want = single[backend]
    assert not torch.equal(want["l1.weight"], W.Net(0).l1.weight.detach())  # the run did move the weights
    assert torch.count_nonzero(want["shift"]) == 0  # zero-initialised under p_bound: stays zero
    for rank, out in enumerate(results):
        assert_params_close(out["fsdp"][backend]["params"], want, f"FSDP2 {world} ranks, rank {rank}, {backend}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.backends(reference=False)
def test_fsdp_one_all_reduce_per_step(request, world, backend):
    for rank, out in enumerate(_ranks(request, world)):
        counts = out["fsdp"][backend]["comm_counts"]
        assert counts == [ONE_ALL_REDUCE] * W.STEPS, f"rank {rank}: {counts}"


@pytest.mark.backends(reference=False)
def test_lars_under_fsdp_matches_single_process_with_one_all_reduce(ranks2, backend):
    want = W.single_process(backend, make=W.lars_optimizer)
    assert not torch.equal(want["l2.weight"], W.Net(0).l2.weight.detach())
    for rank, out in enumerate(ranks2):
        result = out["lars_fsdp"][backend]
        assert_params_close(result["params"], want, f"LARS, FSDP2 2 ranks, rank {rank}, {backend}")
        assert result["comm_counts"] == [ONE_ALL_REDUCE] * W.STEPS, f"rank {rank}: {result['comm_counts']}"


@pytest.mark.backends(reference=False)
def test_monitored_lars_under_fsdp_measures_whole_tensors_with_one_more_all_reduce(ranks2, backend):
    # the update's ‖u‖² of each shard is summed over the ranks before the monitor reads it
    want = W.single_process(backend, make=W.lars_monitored_optimizer)
    relative = want.pop("relative_change")
    assert (relative > 0).all()
    for rank, out in enumerate(ranks2):
        result = out["lars_fsdp_monitored"][backend]
        assert_params_close(result["params"], want, f"monitored LARS, FSDP2 2 ranks, rank {rank}, {backend}")
        atol, rtol = PARITY_TOL
        torch.testing.assert_close(result["relative_change"], relative, rtol=rtol, atol=atol)
        assert result["comm_counts"] == [{"c10d.allreduce_": 2}] * W.STEPS, f"rank {rank}: {result['comm_counts']}"


@pytest.mark.backends(reference=False)
def test_lamb_under_fsdp_matches_single_process_with_two_all_reduces(ranks2, backend):
    # The global gradient norm of max_grad_norm is one all-reduce, the per-tensor sums of the
    # moments pass one more: both needed before the next pass can start.
    want = W.single_process(backend, make=W.lamb_optimizer)
    assert not torch.equal(want["l2.weight"], W.Net(0).l2.weight.detach())
    for rank, out in enumerate(ranks2):
        result = out["lamb_fsdp"][backend]
        assert_params_close(result["params"], want, f"LAMB, FSDP2 2 ranks, rank {rank}, {backend}")
        assert result["comm_counts"] == [{"c10d.allreduce_": 2}] * W.STEPS, f"rank {rank}: {result['comm_counts']}"


def test_stats_bytes_per_step(ranks4):
    # Net has 6 tensors, all sharded over the one mesh dimension: 6 x 3 float32 stats.
    (key, nbytes), = ranks4[0]["fsdp"][BACKENDS[0]]["stats_bytes"].items()
    assert key[1] == (0,) and nbytes == 6 * 3 * 4
    (key, nbytes), = ranks4[0]["hsdp"]["stats_bytes"].items()
    assert key[1] == (1,) and nbytes == 6 * 3 * 4  # the replicated dimension costs nothing


def test_hsdp_matches_single_process_with_one_all_reduce(ranks4, single):
    for rank, out in enumerate(ranks4):
        assert_params_close(out["hsdp"]["params"], single[BACKENDS[0]], f"HSDP 2x2, rank {rank}")
        assert out["hsdp"]["comm_counts"] == [ONE_ALL_REDUCE] * W.STEPS


def _one_step(full_p, full_g):
    p = torch.nn.Parameter(full_p.clone())
    p.grad = full_g.clone()
    fromage_fused.Fromage([p], lr=W.LR, p_bound=W.P_BOUND, backend=BACKENDS[0]).step()
    return p.detach()


def test_sharded_over_two_mesh_dims(ranks4):
    for out in ranks4:
        r = out["sharded_2d"]
        assert_params_close({"p": r["stepped"]}, {"p": _one_step(r["full_p"], r["full_g"])}, "Shard(0),Shard(1)")
        assert r["comm_counts"] == [ONE_ALL_REDUCE]


@pytest.mark.parametrize("world", [2, 4])
def test_partial_gradient_is_reduced_first(request, world):
    for out in _ranks(request, world):
        r = out["partial_grad"]
        want = _one_step(r["full_p"], r["full_g"])
        assert_params_close({"p": r["stepped"]}, {"p": want}, "Replicate param, Partial grad")


def test_ddp_matches_single_process_without_communication(ranks2, single):
    for rank, out in enumerate(ranks2):
        assert_params_close(out["ddp"]["params"], single[BACKENDS[0]], f"DDP rank {rank}")
        assert out["ddp"]["comm_counts"] == [{}] * W.STEPS  # DDP averaged the gradients already


def test_dcp_round_trip_resumes_identically(ranks2):
    for rank, out in enumerate(ranks2):
        r = out["dcp"]
        assert r["max_norm_types"] == [("Tensor", "torch.float32", 0)]
        for saved, loaded in zip(r["saved_max"], r["loaded_max"]):
            assert torch.equal(saved, loaded), f"rank {rank}: max_norm {saved} saved, {loaded} loaded"
        for k in r["continued"]:
            assert torch.equal(r["continued"][k], r["resumed"][k]), f"rank {rank}: {k} differs after resuming"


def test_partial_parameter_is_refused_before_any_change(ranks2):
    for out in ranks2:
        assert "Partial placement" in out["bad_input"]["error"]
        assert out["bad_input"]["unchanged"]


def test_fsdp1_flat_parameters_are_refused():
    # FSDP1 itself needs an accelerator; its FlatParameter is what it would hand the optimizer.
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat, plain = FlatParameter(torch.randn(10)), torch.nn.Parameter(torch.randn(4))
    flat.grad, plain.grad = torch.randn(10), torch.randn(4)
    before = [flat.detach().clone(), plain.detach().clone()]
    opt = fromage_fused.Fromage([plain, flat], lr=W.LR, p_bound=W.P_BOUND)
    with pytest.raises(RuntimeError, match="FSDP1 flat parameter"):
        opt.step()
    assert torch.equal(flat, before[0]) and torch.equal(plain, before[1])


def test_dcp_checkpoint_of_2_ranks_resumes_on_4(ranks2, ranks4):
    want = ranks2[0]["dcp"]["continued"]
    for rank, out in enumerate(ranks4):
        assert_params_close(out["dcp_reshard"]["resumed"], want, f"resumed on 4 ranks, rank {rank}")


@pytest.mark.parametrize("world", [2, 4])
def test_zero_warning_judges_the_full_tensor(request, world):
    outs = _ranks(request, world)
    for key in ["zero_warning"] + (["zero_warning_2d"] if world == 4 else []):
        for rank, out in enumerate(outs):
            [warning] = out[key]  # the same on every rank, whatever its shard holds
            assert "stay zero" in warning and "params[1]" in warning and "params[0]" not in warning, f"rank {rank}"
