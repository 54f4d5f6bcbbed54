"""LAMB's four passes as the Python backends run them, given one backend's ``grad_norm``,
``moments``, ``apply`` and ``adam``: the lists each one receives follow the rule's declarations
(``rule.py``), an absent optional list as None."""
from __future__ import annotations

from .flags import ADAPT, CAUTION, DECOUPLED_DECAY, MONITOR

GRAD_NORM, MOMENTS, APPLY, ADAM = range(4)

#: the columns of the moments pass's sums, per tensor (a = u·k with caution, else u + wd·p with a
#: coupled decay, else u; ⟨a, p⟩ where ``sums_inner``; columns a pass's flags do not call for hold 0)
PP, AA, AP, AGREE, ELEMENTS = range(5)


def sums_inner(flags: int, coupled: float) -> bool:
    """Whether the moments pass sums ⟨a, p⟩: a cautious update's norm needs it with a coupled decay,
    the monitor's change of p with a decoupled one (csrc/rule_lamb.h and kernels/rule_lamb.py: the same)."""
    return bool(flags & CAUTION) and coupled != 0 or bool(flags & MONITOR) and bool(flags & DECOUPLED_DECAY)


def run_pass(index: int, call, grad_norm, moments, apply, adam):
    if index == GRAD_NORM:
        (grads,) = call.lists
        return grad_norm(grads, call)
    if index == MOMENTS:
        if call.flags & ADAPT:
            exp_avgs, exp_avg_sqs, params, grads = call.lists
        else:
            (exp_avgs, exp_avg_sqs, grads), params = call.lists, None
        return moments(exp_avgs, exp_avg_sqs, params, grads, call)
    if index == APPLY:
        if call.flags & CAUTION:
            params, exp_avgs, exp_avg_sqs, grads = call.lists
        else:
            (params, exp_avgs, exp_avg_sqs), grads = call.lists, None
        apply(params, exp_avgs, exp_avg_sqs, grads, call)
        return None
    params, exp_avgs, exp_avg_sqs, grads = call.lists
    adam(params, exp_avgs, exp_avg_sqs, grads, call)
    return None
