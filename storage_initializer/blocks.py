"""The unit of streaming I/O, one value for the whole code base.

Every loop that copies, hashes, extracts or downloads bytes reads ``BLOCK`` at a time: large
enough that per-call overhead vanishes next to the bytes, small enough that the buffers of every
worker thread stay far inside the init container's 1 GiB (docs/performance.md).
"""

BLOCK = 1 << 20
