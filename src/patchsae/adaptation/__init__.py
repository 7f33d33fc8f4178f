"""Adaptation: MaPLe prompt training and base/novel accuracy (pure computation; the stages write)."""
