"""Trainers for both stages and the loop they share."""
