"""Evaluation: zero-shot classification, image-text retrieval, linear probes and reports.

Submodules are imported directly (``from clipforge.eval.retrieval import retrieval_metrics``) so that
importing the package stays cheap.
"""
