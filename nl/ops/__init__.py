"""Numerical kernels; every fast path sits next to its naive reference.

delta_rule: one linear layer trained in context by Delta Gradient Descent (token step + chunk form).
titans:     the self-modifying Titans recurrence (token-by-token reference + chunked form).
"""
