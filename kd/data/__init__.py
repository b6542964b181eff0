"""LightningDataModules. Every one yields batches as dicts: ``input``, ``target``, ``index``."""

from kd.data.cifar import CIFARDataModule
from kd.data.digits import DigitsDataModule
from kd.data.imagenet import ImageNetDataModule
from kd.data.mnist import MNISTDataModule
from kd.data.tensor import IndexedTensorDataset, stratified_split

__all__ = ["CIFARDataModule", "DigitsDataModule", "ImageNetDataModule", "MNISTDataModule", "IndexedTensorDataset", "stratified_split"]
