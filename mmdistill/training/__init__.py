"""The training floor: pair sets, feature cache, losses, retrieval, the one student trainer,
the evaluation protocol and expert trajectories."""
