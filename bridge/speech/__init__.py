"""Speech: streaming VAD, conversations, the transcription worker and its on-disk spool.

The daemon needs three things: one ``AsrWorker`` (start/stop/health/backlog), one
``SpeechPipeline`` per device (a ``PcmSink``: ``write``/``close``/``recover``), and a callback
that takes each finished ``bridge.core.records.Conversation``.
"""

from bridge.speech.asr.worker import AsrWorker, WorkerHealth, load_model
from bridge.speech.pipeline import SpeechPipeline

__all__ = ["AsrWorker", "SpeechPipeline", "WorkerHealth", "load_model"]
