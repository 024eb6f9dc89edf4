"""GPU kernels and attention processors: the Triton flash-attention kernel (``attention``) and the
"sdpa" / "xformers" / "triton" processors with guidance-aware shared K/V (``processors``)."""
