"""The destination on the shared volume: entries, markers, leases, staging, commit and links.

The store knows nothing of clouds; it only knows files and the lock protocol of docs/store.md.
"""
