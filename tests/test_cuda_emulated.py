"""The CUDA kernels of csrc/ executed on the CPU: every ``__global__`` kernel, through the stand-in
runtime of tests/cuda_stand_in (CUDA threads as fibers, blocks concurrently on several OS threads,
each with its own shared-memory arena), under AddressSanitizer + UndefinedBehaviorSanitizer, and once
under ThreadSanitizer.

Each group mixes empty tensors (one with a null address), tensors of one block, of one element
more than a block and of several blocks, in fp32, bf16 (rounded to nearest and stochastically) and
fp16, with views aligned, misaligned by the same amount and misaligned differently. A step is
checked against the float64 stats, the README's bit model (the apply phase bit for bit, max_norm
included), the float64 oracle, found_inf (nothing changes) and grad_scale (the fallback branch).
Results must not depend on how the threads and blocks were scheduled.

The harness builds once per state of the sources (``_cuda_emu.build``, cached); the planted-bug
meta-test is test_cuda_emulated_bugs.py.
"""
import numpy as np
import pytest

import _bit_model as bm
import _cuda_emu as emu
import _emulated_groups as groups

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++20 compiler (g++ >= 11 or clang++ >= 14)")


def build(variant):
    why = emu.unsupported(variant)
    if why is not None:
        pytest.skip(why)
    return emu.build(variant)


@pytest.fixture(scope="module")
def asan():
    return build("asan")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The checks' torch ops on one thread: the harness's workers use the cores."""


def _run(binary, group, **options):
    job = emu.Job(**options)
    groups.add_step(job, group)
    return job.run(binary)


@pytest.mark.parametrize("alignment", groups.ALIGNMENTS)
@pytest.mark.parametrize("fmt", list(groups.FORMATS))
def test_a_step_is_the_bit_model_and_the_oracle(asan, fmt, alignment):
    seed = list(groups.FORMATS).index(fmt) * 10 + groups.ALIGNMENTS.index(alignment)
    group = groups.make_group(groups.FORMATS[fmt], alignment, seed=seed)
    result = _run(asan, group, slots=3, order="shuffle", seed=seed)
    problems = groups.check(group, result)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("fmt", list(groups.FORMATS))
def test_options_without_p_bound_found_inf_or_grad_scale(asan, fmt):
    group = groups.make_group(groups.FORMATS[fmt], "same", sizes=(0, 1, 3, 65537, 0), seed=40, p_bound=None,
                              grad_scale=None, found_inf=False, maximize=True, prefactor=False)
    problems = groups.check(group, _run(asan, group, slots=2, order="reverse"))
    assert not problems, "\n".join(problems)


def test_results_do_not_depend_on_scheduling(asan):
    # Threads woken in order, in reverse, shuffled; blocks one at a time or several at once.
    group = groups.make_group(groups.FORMATS["bf16-sr"], "mixed", sizes=(3, 65537, 131584, 0), seed=50)
    runs = [_run(asan, group, slots=1, order="forward"), _run(asan, group, slots=4, order="reverse"),
            _run(asan, group, slots=3, order="shuffle", seed=9)]
    for result in runs:
        assert result.report is None, result.stderr[-3000:]
    assert runs[0].dumps == runs[1].dumps == runs[2].dumps
    assert not groups.check(group, runs[0])


def test_stochastic_rounding_kernel_is_the_readme_recipe(asan):
    rng = np.random.default_rng(0)
    bits = bm.hard_fp32_bits(rng, n_random=20_000)
    job = emu.Job(slots=2, order="shuffle", seed=3)
    x = job.buffer(bits.view(np.float32))
    out = job.buffer(2 * bits.size)
    seed = job.buffer(emu.pack_i64(-77))
    job.launch("round_bf16", x, out, bits.size, seed, 5)
    job.dump(out)
    result = job.run(asan)
    assert result.report is None, result.stderr[-3000:]
    got = np.frombuffer(result.dumps[out], dtype=np.uint16)
    np.testing.assert_array_equal(got, bm.sr_bits(bits, -77, 5))


def test_one_step_under_thread_sanitizer():
    # Multi-block tensors whose blocks run on different workers: the cross-block reduction of the
    # stats and the max_norm a tensor's first block sets while its other blocks read it.
    tsan = build("tsan")
    group = groups.make_group(groups.FORMATS["bf16-sr"], "aligned", sizes=(0, 3, 65537, 131584, 0), seed=60)
    result = _run(tsan, group, slots=3, order="shuffle", seed=1)
    problems = groups.check(group, result)
    assert not problems, "\n".join(problems)
