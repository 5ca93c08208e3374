"""Running recipes: the runner and its run folder, checkpoints, comparisons and exports."""
