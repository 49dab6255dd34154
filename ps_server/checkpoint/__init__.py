"""Checkpoint files: TFRecord framing, table and filter dumps, checkpoint layout.

Everything here reads and writes Monolith-compatible files (TFRecord streams of
Monolith's protobuf messages). Writes are atomic (temporary name, fsync, rename);
reads verify every CRC and raise :class:`ps_server.errors.CheckpointCorruptError`
naming the file and the byte offset before any live state is changed.
"""
