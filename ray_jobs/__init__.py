"""Thin Ray entry points: parse arguments, build Ray pieces, call ``agecore``."""
