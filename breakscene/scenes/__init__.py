"""Scenes: an image and its masks, read and checked; mask helpers; generated scenes; mask noise."""
