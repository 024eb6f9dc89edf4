"""The toy world: the procedural shapes data set, the training of the shipped default models, the
tiny models that tests build in code, the evaluation kit (attribute classifiers, metrics, grids),
LinearAG calibration and the analytic Gaussian-mixture scores. The library path never imports it
at module level; GFCG's provider reaches the shipped classifiers inside the call that needs them."""
