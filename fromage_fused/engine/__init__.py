"""The multi-tensor engine: everything a step needs that is not an optimizer's update rule.

It knows no optimizer. A rule (``fromage_fused.rules``) declares its hyper-parameters, its state,
its passes and its math; the engine validates, groups, plans, creates and lays out state, resolves
backends, launches the passes, combines sums across groups and ranks, and keeps monitoring records
(see docs/design.md, "Engine and rules").
"""
