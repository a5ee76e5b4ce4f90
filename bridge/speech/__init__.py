"""Speech: streaming VAD, conversations, the transcription worker and its on-disk spool."""
