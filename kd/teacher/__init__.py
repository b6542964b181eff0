"""The teacher: where it comes from (``source``: a checkpoint, pretrained weights, the store or
training it now; ``get_teacher`` gives a run its ``Teacher``) and the cache of its outputs
(``cache``). Reading weights files is ``kd.models.weights``.
"""
