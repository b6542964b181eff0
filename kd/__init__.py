"""kd: knowledge distillation and model compression on Lightning and Hydra."""
__version__ = "0.1.0"
