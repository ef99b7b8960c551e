"""Low-bit context K/V: dequantization reference (reference.py) and Triton helpers (triton.py)."""
