"""Delivery: the durable outbox and the Omi developer API client.

- ``payload``: a ``Conversation`` → the exact request bodies (``request_bodies``).
- ``store``: ``Outbox`` (SQLite, WAL): ``Outbox.open(dir)``, ``enqueue(conv, location, now)``.
- ``client``: key/base_url resolution and what each HTTP answer means (``classify``).
- ``sender``: ``Sender(outbox, api)``: ``deliver()`` for the CLI, ``run(stop)``/``wake()`` for
  the daemon, ``status()``; ``outbox_status(outbox, api, now)`` without a sender.
- ``commands``: ``omi-bridge outbox`` and ``send_conversations`` (``transcribe --send``).

Modules are imported directly (not re-exported here) so the speech stage can use ``payload``
without loading httpx.
"""
