"""Delivery: the durable outbox and the Omi developer API client."""
