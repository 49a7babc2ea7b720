"""Training: the run's data, optimizer, the one training build, the jitted step and the loop around it."""
