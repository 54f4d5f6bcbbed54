"""The flag bits of LAMB's passes: the spec's (``bias_correction`` = 1, ``grad_averaging`` = 2,
``trust_clip`` = 4, ``always_adapt`` = 8, ``caution`` = 16, ``decoupled_decay`` = 32,
``corrected_weight_decay`` = 64, in its order) and the derived ones below, which the rule computes
from the group's values at every step (they are Python numbers: no tensor is read)."""
BIAS_CORRECTION = 1
GRAD_AVERAGING = 2
TRUST_CLIP = 4
ALWAYS_ADAPT = 8
CAUTION = 16
DECOUPLED_DECAY = 32
CORRECTED_WEIGHT_DECAY = 64
CLIP = 128  # max_grad_norm is not None: pass 0 reduces ‖g‖², combined over every group into the clip divisor
ADAPT = 256  # weight_decay != 0 or always_adapt: the trust ratio applies (‖p‖ is needed)
NORMS = 512  # ADAPT or CAUTION: the update needs per-tensor sums of itself (moments, then apply)
PLAIN = 1024  # neither: Adam in one pass (adam)
MONITOR = 2048  # monitoring: the global-norm pass runs without max_grad_norm too; with decoupled_decay
#                 the moments pass also sums <u, p> (the change of p needs it)
