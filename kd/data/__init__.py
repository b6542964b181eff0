"""LightningDataModules. Every one yields batches as dicts: ``input``, ``target``, ``index``."""

from kd.data.digits import DigitsDataModule
from kd.data.tensor import IndexedTensorDataset, stratified_split

__all__ = ["DigitsDataModule", "IndexedTensorDataset", "stratified_split"]
