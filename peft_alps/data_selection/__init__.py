"""Capability-aware data selection (PASER, He et al. 2025): choose the samples on which a modified model
degraded most, spread over capability groups, for probe fine-tunes, head training and recovery.

:func:`select_data` is the entry point; the steps live in ``embed`` (MiniLM sentence embeddings), ``cluster``
(sparse kNN spectral clustering), ``degradation`` (per-sample JSD or loss), ``conflicts`` (RAKE concept graph)
and ``select`` (budget allocation, ranking, the selection itself).
"""

from .select import ClusterStats, DataSelection, allocate_budget, rank_in_cluster, select_data

__all__ = ["ClusterStats", "DataSelection", "allocate_budget", "rank_in_cluster", "select_data"]
