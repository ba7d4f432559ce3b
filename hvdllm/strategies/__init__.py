"""Parallel strategies: framework-free plans (schedules, layouts) that the backends execute."""
