"""Behaviour logs in: readers, validation, binning, behaviour text, importers."""
