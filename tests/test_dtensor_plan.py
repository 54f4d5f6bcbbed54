"""The step plan over DTensor parameters in one process (gloo, world size 1): a local shard that is
replaced between steps (FSDP2 resets its sharded parameters' local tensors) rebuilds the plan, FSDP2
itself steps as plain tensors do, and process groups do not outlive ``destroy_process_group``."""
import pytest
import torch
from torch import nn

from fromage_fused import Fromage

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402


@pytest.fixture
def world():
    """A fresh one-rank process group per test (a test may destroy and re-create it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _sharded(mesh, seed, placements=(Shard(0),)):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(distribute_tensor(torch.randn(6, 4, generator=gen), mesh, list(placements)))
    return p


def _grad(p, step):
    gen = torch.Generator().manual_seed(100 + step)
    p.grad = distribute_tensor(torch.randn(6, 4, generator=gen), p.device_mesh, list(p.placements))


@pytest.mark.parametrize("force_reuse", [False, True])
def test_a_replaced_local_shard_rebuilds_the_plan(world, force_reuse, monkeypatch):
    from fromage_fused.engine import plan as _step_plan

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    runs = []
    for fresh in (False, True):
        p = _sharded(mesh, 0)
        opt = Fromage([p], lr=0.1, p_bound=1.5, backend="foreach")
        _grad(p, 0)
        opt.step()
        # what FSDP2's reset_sharded_param does: the DTensor keeps its identity, its local tensor is new
        old = p._local_tensor
        p._local_tensor = old.clone()
        _grad(p, 1)
        if fresh:
            opt._invalidate_plan()
        elif force_reuse:
            monkeypatch.setattr(_step_plan.StepPlan, "refresh", lambda self, o: True)
        before = old.clone()
        opt.step()
        monkeypatch.undo()
        runs.append((p._local_tensor.clone(), torch.equal(old, before)))
    (reused, old_untouched), (fresh, _) = runs
    if force_reuse:  # the old shard was stepped, the new one not: the test sees a reused plan
        assert not torch.equal(reused, fresh) and not old_untouched
    else:
        assert torch.equal(reused, fresh) and old_untouched


def test_fsdp2_on_one_rank_steps_as_plain_tensors(world):
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9):
        pytest.skip("FSDP2 gradients under gloo are right from torch 2.9")
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    plain, sharded = model(), model()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    # built before the first forward, which resets the sharded parameters' local tensors
    opts = [Fromage(m.parameters(), lr=0.05, p_bound=1.0, backend="foreach") for m in (plain, sharded)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 5, generator=gen)
        for m, opt in zip((plain, sharded), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(b.full_tensor(), a.detach(), atol=1e-6, rtol=1e-5)


def test_flattened_groups_do_not_outlive_destroy_process_group(world, monkeypatch):
    # A tensor sharded over both dimensions of a 2-D mesh reduces over the flattened group. After
    # destroy_process_group and a new init, an equal mesh must bring its own group, not the dead one
    # (one rank still computes on a dead gloo group, so the test asks torch whether it is alive).
    used = []
    all_reduce = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        used.append(dist.get_process_group_ranks(group))  # KeyError for a destroyed group
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", spy)
    for attempt in range(2):
        if attempt:
            dist.destroy_process_group()
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
        p = _sharded(mesh, attempt, placements=(Shard(0), Shard(1)))
        opt = Fromage([p], lr=0.1, backend="foreach")
        _grad(p, attempt)
        before = p.detach().to_local().clone()
        opt.step()
        assert not torch.equal(before, p.detach().to_local())
    assert used == [[0], [0]]


@pytest.mark.gpu
def test_the_rounding_seed_follows_its_parameter_to_another_device():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = Fromage([p], lr=0.01, stochastic_rounding=True, seed=5)
    p.grad = torch.randn_like(p)
    opt.step()
    p.data = p.data.cuda()
    p.grad = torch.randn(64, device="cuda").to(torch.bfloat16)
    seed_before = opt.state[p]["sr_seed"].item()
    opt.step()
    seed = opt.state[p]["sr_seed"]
    assert seed.device == p.device and seed.item() == seed_before + 1
    assert opt.state[p].get("max_norm") is None
