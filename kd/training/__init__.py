"""Training a student: ``run(cfg)`` (the pipeline), the LightningModule, the method's preparation,
its preliminary stages, checkpoints and resume, loggers.

Read ``kd.training.run`` first: it is the whole run, top to bottom.
"""
