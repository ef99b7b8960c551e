"""Kernels: one folder per family, each with its plain-torch reference, its Triton kernels and
their launcher side by side.

lookup/     centroid lookup (flat, hierarchical; threshold or fixed budget) -> selected clusters
attention/  exact attention over the selected clusters + window + new tokens
triton_common.py  the optional triton import and launch helpers both families share
"""
