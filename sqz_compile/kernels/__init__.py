"""Kernels: one family per file, each with its plain-torch reference beside it.

lookup.py     centroid lookup (flat, hierarchical; threshold or fixed budget) -> selected clusters
attention.py  exact attention over the selected clusters + window + new tokens
"""
