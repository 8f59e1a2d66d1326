"""Mask quality: the score, its image-aware evidence, and the shipped model."""
