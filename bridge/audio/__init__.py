"""Audio: depacketize notifications, decode (Opus / PCM / µ-law), conceal loss."""
