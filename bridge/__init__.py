"""omi-bridge: a Raspberry Pi daemon between an Omi pendant or Frame glasses and Omi."""

__version__ = "0.1.0"
