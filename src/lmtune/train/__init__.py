"""Training: the loop, objectives, checkpoints, schedules, in-training chat probes."""
