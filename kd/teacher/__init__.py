"""The teacher: where it comes from (``source``: a checkpoint, pretrained weights, the store or
training it now), how its weights are read (``weights``), and the cache of its outputs (``cache``).
"""
