"""The contracts every stage shares: PCM timeline unit, records, link stats, errors, GATT numbers.

Nothing here imports another part of the bridge; every stage imports from here.
"""
