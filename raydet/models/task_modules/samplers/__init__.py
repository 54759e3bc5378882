"""Samplers: the positive and negative priors a head trains on, picked from an ``AssignResult``."""
from raydet.models.task_modules.samplers.hard_negative_mining import hard_negative_mining
from raydet.models.task_modules.samplers.pseudo_sampler import PseudoSampler
from raydet.models.task_modules.samplers.random_sampler import RandomSampler
from raydet.models.task_modules.samplers.sampling_result import SamplingResult
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.models.task_modules.samplers.base_sampler import BaseSampler
from raydet.models.task_modules.samplers.instance_balanced_pos_sampler import InstanceBalancedPosSampler
from raydet.models.task_modules.samplers.iou_balanced_neg_sampler import IoUBalancedNegSampler
from raydet.models.task_modules.samplers.combined_sampler import CombinedSampler
from raydet.models.task_modules.samplers.ohem_sampler import OHEMSampler

__all__ = ["SamplingResult", "RandomSampler", "PseudoSampler", "hard_negative_mining",
           "SamplingContext", "BaseSampler", "InstanceBalancedPosSampler", "IoUBalancedNegSampler", "CombinedSampler",
           "OHEMSampler"]
