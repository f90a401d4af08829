"""Specialization of a trained supernet: cost models, latency tables, accuracy predictor, evolutionary search, export.
"""
from .budget import Budget, parse_budgets
from .cost import AdditiveCost, BlockLayout, as_codes, flops_model, format_cost, params_model
from .evolution import EvolutionConfig, SearchResult, evolve, resolve_constraints, specialize
from .export import EXPORT_FORMATS, export_subnet, load_supernet
from .flops import count_flops, count_params
from .latency import (
    BACKENDS, LatencySettings, LatencyTable, build_latency_table, measure_subnets, validate_latency_table,
    validation_summary)
from .predictor import (
    AccuracyPredictor, ArchEncoder, EncoderConfig, FitConfig, build_accuracy_dataset, dataset_space, fit_predictor,
    read_accuracy_dataset, spearman)

__all__ = [
    'count_flops', 'count_params', 'AdditiveCost', 'BlockLayout', 'as_codes', 'flops_model',
    'params_model', 'format_cost', 'EvolutionConfig', 'SearchResult', 'evolve', 'specialize', 'resolve_constraints',
    'AccuracyPredictor', 'ArchEncoder', 'EncoderConfig', 'FitConfig', 'build_accuracy_dataset', 'fit_predictor',
    'read_accuracy_dataset', 'dataset_space', 'spearman', 'EXPORT_FORMATS', 'export_subnet', 'load_supernet',
    'BACKENDS', 'LatencySettings', 'LatencyTable', 'build_latency_table', 'measure_subnets', 'validate_latency_table',
    'validation_summary', 'Budget', 'parse_budgets',
]
