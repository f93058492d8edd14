"""dsc_kernels."""
