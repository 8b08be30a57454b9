"""Workload stage (profile -> **workload**): the training options as enums, what trains (the
parameter inventory under freezing and LoRA), media tokens per sample, the reference setup."""
