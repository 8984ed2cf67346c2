"""The training run itself: the loop, parallelism, optimiser, metrics, output checks, sampling."""
