"""The flag bits of LARS's passes: the spec's (``nesterov`` = 1, ``trust_clip`` = 2, ``always_adapt``
= 4, in its order) and the derived ones below, which the rule computes from the group's values at
every step (they are Python numbers: no tensor is read)."""
NESTEROV = 1
TRUST_CLIP = 2
ALWAYS_ADAPT = 4
MOMENTUM = 8  # momentum != 0: the buffer exists, is updated, and the step follows it
ADAPT = 16  # weight_decay != 0 or always_adapt: the trust ratio applies (pass 0 computes the norms)
MONITOR = 32  # monitoring: pass 0 computes the norms in a group that does not adapt too; pass 1 reduces ‖u‖²
