"""Seeing inside a trained model: per-token gates, predictions, cell finding, reports.

:func:`analyze` runs a :class:`~glasslstm.model.LanguageModel` over a text once, with
``return_gates=True``, and returns an :class:`Analysis`: plain NumPy arrays and strings that
every view (terminal, HTML, PNG, web) renders without touching torch.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glasslstm.inspection.analysis import Analysis, analyze

__all__ = ["Analysis", "analyze"]


def __getattr__(name: str):
    # imported on first use: the views' modules (and the command line) import this package's
    # torch-free parts without loading the model code
    if name in __all__:
        from glasslstm.inspection import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module 'glasslstm.inspection' has no attribute {name!r}")
