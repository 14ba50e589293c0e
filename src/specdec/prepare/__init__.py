"""Preparing inputs: prompt datasets, model folders and the training of draft heads."""
