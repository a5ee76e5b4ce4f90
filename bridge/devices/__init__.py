"""Device drivers: what happens on a connection to an Omi pendant or Frame glasses."""
