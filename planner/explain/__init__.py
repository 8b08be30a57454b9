"""Explain stage (writers -> **explain**): read the files a user already has (DeepSpeed JSON, launch
scripts, LLaMA-Factory YAML, TrainingArguments) back into options through the key map, and
diagnose them (the estimate, the binding budget, traps, re-estimated fixes). Never executes them."""
