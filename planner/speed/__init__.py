"""Speed stage (estimate -> **speed**): FLOPs, bytes moved and seconds per optimizer step; used by the
search to rank what fits."""
