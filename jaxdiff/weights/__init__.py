"""Reading and writing checkpoints in the formats users have."""
