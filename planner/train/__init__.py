"""The built-in trainer (`memplan train`, ``python -m planner.train PLAN_DIR``): HF Trainer on a plan
folder, training exactly the plan's inventory. Needs the ``train`` extra (torch, transformers,
deepspeed, peft)."""
