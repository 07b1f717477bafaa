"""U-Nets (paper F.1) and Efficient U-Nets (F.2, F.3)."""
