"""Fake-quant kernel sources (installed as mlx_qat.kernels): the shared bodies and their preambles."""
