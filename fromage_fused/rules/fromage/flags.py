"""The flag bits of Fromage's kernels: the spec's (``maximize`` = 1, ``prefactor`` = 2, in its
order) and the derived ones below (``csrc/rule_fromage.h`` and ``kernels/rule_fromage.py`` use the
same values)."""
MAXIMIZE = 1
PREFACTOR = 2
BOUND = 4  # p_bound is set: max_norm exists, the clamp applies
INNER = 8  # pass 0 computes <p, g> (the clamp and monitoring read it)
