"""Evaluation of generated shapes images: `detector` (jaxdiff's own object detector and scorer)."""
