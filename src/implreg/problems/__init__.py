"""What is fitted: synthetic ground truths and their observations."""
