"""What the LARS/LAMB parity tests share: the usual two param groups, and gradients that are
sometimes None and sometimes zero."""
import torch


def split(model):
    """Matrices and filters (decayed) and vectors (not decayed): the usual two groups."""
    params = list(model.parameters())
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


def schedule(grads, step, group_of):
    """None for some parameters on some steps, all zeros for others; parameter 1 gets its first
    gradient at step 10; group 1 gets none at all on steps 3, 53, 103 and 153."""
    out = []
    for i, g in enumerate(grads):
        if (i + step) % 7 == 0 or (i == 1 and step < 10) or (group_of[i] == 1 and step % 50 == 3):
            out.append(None)
        elif (i + step) % 5 == 0:
            out.append(torch.zeros_like(g))
        else:
            out.append(g)
    return out
