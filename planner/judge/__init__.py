"""Judges (beside the flow): real components that check memplan's numbers: a real training step traced on
fake CUDA tensors under torch's MemTracker, and its comparison with the estimate."""
