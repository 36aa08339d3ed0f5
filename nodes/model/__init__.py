"""The model side of the glue: what a model is (identity), how VCT calls it (denoiser, controls, guidance),
what it takes (conditioning) and how VCT trains through it (training, recompute)."""
