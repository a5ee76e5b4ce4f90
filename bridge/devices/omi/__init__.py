"""The Omi pendant: codec, audio notifications, battery, button, time sync."""
