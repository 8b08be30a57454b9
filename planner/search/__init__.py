"""Search stage (speed -> **search**): the declarative space, the search for setups that fit ranked by
speed, and the fixes (more host RAM, more GPUs) that tune and explain share."""
