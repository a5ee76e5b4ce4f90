"""Transcription: one worker thread that turns spooled utterance windows into segments."""
