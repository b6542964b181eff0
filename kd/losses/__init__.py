"""Distillation methods: one ``nn.Module`` per method, returning named weighted terms.

Configs name each class by its module path (``kd.losses.dkd.DKDLoss``); the classes are also
importable from here.
"""

from kd.losses.ab import ABLoss
from kd.losses.at import ATLoss
from kd.losses.base import DistillationLoss, Stage
from kd.losses.camkd import CAMKDLoss
from kd.losses.cc import CCLoss
from kd.losses.ce import CrossEntropy
from kd.losses.combined import Combined
from kd.losses.crd import CRDLoss
from kd.losses.cskd import CSKDLoss
from kd.losses.dist import DISTLoss
from kd.losses.dkd import DKDLoss
from kd.losses.dml import DMLLoss
from kd.losses.fitnet import FitNetLoss
from kd.losses.fsp import FSPLoss
from kd.losses.ft import FTLoss
from kd.losses.kd import KDLoss, kd_loss
from kd.losses.kdcl import KDCLLoss
from kd.losses.logit_std import LogitStandardKD
from kd.losses.mlkd import MLKDLoss
from kd.losses.nst import NSTLoss
from kd.losses.ofd import OFDLoss
from kd.losses.pkt import PKTLoss
from kd.losses.reviewkd import ReviewKDLoss
from kd.losses.rkd import RKDLoss
from kd.losses.sp import SPLoss
from kd.losses.tfkd import TfKDRegLoss
from kd.losses.vid import VIDLoss

__all__ = [
    "ABLoss", "ATLoss", "CAMKDLoss", "CCLoss", "CRDLoss", "CSKDLoss", "Combined", "CrossEntropy", "DISTLoss", "DKDLoss",
    "DMLLoss", "DistillationLoss", "FSPLoss", "FTLoss", "FitNetLoss", "KDCLLoss", "KDLoss", "LogitStandardKD", "MLKDLoss",
    "NSTLoss", "OFDLoss", "PKTLoss", "RKDLoss", "ReviewKDLoss", "SPLoss", "Stage", "TfKDRegLoss", "VIDLoss", "kd_loss",
]
