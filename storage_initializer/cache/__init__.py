"""Entries on the volume, once written: reading, checking, keeping within bounds, tiering.

- :mod:`.survey`: a whole cache directory at a glance (``status --cache-dir``, gc's input);
- :mod:`.status_verify`: one entry, read without changing it (``status``, ``verify``);
- :mod:`.repair`: ``verify --repair``, re-downloading only the damaged files;
- :mod:`.eviction`: ``gc`` and the automatic size limit: evicting entries, removing leftovers;
- :mod:`.tiers`: several ``--cache-dir`` tiers, fastest first, with copy-up.

How an entry is written (lease, staging, marker, commit) is :mod:`storage_initializer.store`.
Nothing is imported here: each command imports only the module it needs.
"""
