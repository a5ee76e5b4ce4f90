"""Brilliant Labs Frame glasses: our Lua app, its upload, and its PCM stream."""
