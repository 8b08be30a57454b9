"""Launch stage (writers -> **launch**): a plan folder -> the argv that runs it, the run and its record,
out-of-memory failures recognised and the next safer plan."""
