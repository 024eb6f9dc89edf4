"""GPU kernels and attention processors (Triton). Empty until the attention-kernel issue lands."""
