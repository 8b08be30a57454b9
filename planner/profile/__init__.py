"""Profile stage (first in the flow): GPU and model specs from TOML and config.json, parameter
inventories, the cluster a plan is for. Imports nothing of the later stages."""
