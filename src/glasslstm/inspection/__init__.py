"""Seeing inside a trained model: per-token gates, predictions, cell finding, reports.

:func:`analyze` runs a :class:`~glasslstm.model.LanguageModel` over a text once, with
``return_gates=True``, and returns an :class:`Analysis`: plain NumPy arrays and strings that
every view (terminal, HTML, PNG, web) renders without touching torch.
"""

from glasslstm.inspection.analysis import Analysis, analyze

__all__ = ["Analysis", "analyze"]
