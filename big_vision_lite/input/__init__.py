"""Input pipeline: tfds data sources read with grain, big_vision-style pp ops, packing."""
