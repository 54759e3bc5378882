"""Samplers: the positive and negative priors a head trains on, picked from an ``AssignResult``."""
from raydet.models.task_modules.samplers.hard_negative_mining import hard_negative_mining
from raydet.models.task_modules.samplers.pseudo_sampler import PseudoSampler
from raydet.models.task_modules.samplers.random_sampler import RandomSampler
from raydet.models.task_modules.samplers.sampling_result import SamplingResult

__all__ = ["SamplingResult", "RandomSampler", "PseudoSampler", "hard_negative_mining"]
