"""Preference pairs built the way MMPR was: correctness pairs and DropoutNTP pairs; `mpo eval`."""
